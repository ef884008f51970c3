"""The session cluster itself: started on the port we chose (never 6379), with token authentication
on its GCS and on its dashboard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from workers.cluster import AUTH_MODE_ENV, AUTH_TOKEN_ENV, per_node, trainers_of, workers_that_fit


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_port_and_token_auth(ray_cluster: Any) -> None:
    port = int(ray_cluster.address.rsplit(":", 1)[1])
    assert port != 6379
    with socket.create_connection(("127.0.0.1", port), timeout=5):  # the GCS listens where we said
        pass
    assert os.environ[AUTH_MODE_ENV] == "token" and len(os.environ[AUTH_TOKEN_ENV]) == 64
    connect = f"import ray; ray.init(address={ray_cluster.address!r}); print(ray.cluster_resources()['CPU'])"
    ok = subprocess.run([sys.executable, "-c", connect], capture_output=True, text=True, timeout=100)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("2.0"), ok.stderr[-2000:]
    # Without the token a driver is refused (one attempt instead of Ray's ~20 one-second retries).
    env = {**os.environ, AUTH_TOKEN_ENV: "0" * 64, "RAY_gcs_server_port_wait_time_s": "1"}
    refused = subprocess.run([sys.executable, "-c", connect], capture_output=True, text=True, timeout=100, env=env)
    assert refused.returncode != 0
    assert "AuthenticationError" in refused.stderr or "InvalidAuthToken" in refused.stderr, refused.stderr[-2000:]
    # The dashboard (Jobs API) is on loopback and wants the bearer token too.
    import httpx

    assert ray_cluster.dashboard_url.startswith("http://127.0.0.1:")
    jobs = f"{ray_cluster.dashboard_url}/api/jobs/"
    assert httpx.get(jobs, timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {os.environ[AUTH_TOKEN_ENV]}"}
    assert httpx.get(jobs, headers=bearer, timeout=10).status_code == 200


def test_free_ports_are_distinct_and_free() -> None:
    from cdsp_core.ray_head import PORT_RANGE, free_ports

    ports = free_ports(40)
    assert len(set(ports)) == 40
    # Away from the OS's ephemeral ports, which outgoing connections and bind(0) take.
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    for port in ports:  # none is held once chosen
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_head_refused_for_a_port_clash_starts_again_on_fresh_ports(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure CI once met: two components handed one port. Ray refuses such a head at once; it
    is started again on fresh ports instead of failing the caller."""
    from cdsp_core import ray_head

    real, calls = ray_head.free_ports, []

    def first_clashes(n: int) -> list[int]:
        ports = real(n)
        if not calls:  # object manager and dashboard agent on one port, as in the CI log
            ports[ray_head.PORT_FLAGS.index("dashboard-agent-listen-port")] = ports[
                ray_head.PORT_FLAGS.index("object-manager-port")
            ]
        calls.append(ports)
        return ports

    monkeypatch.setattr(ray_head, "free_ports", first_clashes)
    log = tmp_path / "head.log"
    head, proc = ray_head.start_head(num_cpus=1, dashboard=False, log_path=log, timeout=90)
    try:
        assert len(calls) == 2 and proc.poll() is None
        assert head.gcs_address.endswith(f":{calls[1][0]}")
        assert "used by other components" in log.read_text()
    finally:
        ray_head.stop_head(head, proc)


def test_what_fits_follows_the_placement_and_rays_resource_units() -> None:
    two = [{"CPU": 8.0}, {"CPU": 8.0}]
    assert per_node(two, 4, False) == [2, 2]
    # A trainer of 4 workers x 4 CPUs: anywhere, yes; all on one node, no (2 fit); 2 nodes for spread.
    assert [workers_that_fit(two, 4, False, p) for p in ("pack", "spread", "strict_pack", "strict_spread")] == [
        4, 4, 2, 2,
    ]  # fmt: skip
    assert workers_that_fit([{"CPU": 16.0}], 1, False, "strict_spread") == 1  # one node: one worker per node
    assert per_node([{"CPU": 1.0}], 0.1, False) == [10]  # 1 // 0.1 is 9.0 in floats
    assert per_node([{"CPU": 16.0, "GPU": 1.0}, {"CPU": 16.0}], 2, True) == [1, 0]
    assert workers_that_fit([], 1, False, "strict_pack") == 0


def test_trainers_side_by_side_by_placement() -> None:
    assert [trainers_of([3, 3], 2, p) for p in ("pack", "strict_pack", "strict_spread")] == [3, 2, 3]
    # strict_spread: each trainer needs 2 distinct nodes; node A holds 5 but serves each trainer once.
    assert trainers_of([5, 1, 1], 2, "strict_spread") == 2
    assert trainers_of([1], 2, "strict_spread") == 0
    assert trainers_of([0, 0], 1, "pack") == 0
    # One trainer per node at most once each: 64 nodes of 10**6 slots, trainers of 8 -> 64 * 10**6 // 8,
    # bounded by slots; found by bisection, not by trying every count.
    assert trainers_of([10**6] * 64, 8, "strict_spread") == 8 * 10**6
    assert trainers_of([3, 3, 3, 1], 3, "strict_spread") == 3
