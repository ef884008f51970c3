"""The session cluster itself: started on the port we chose (never 6379), with token authentication
on its GCS and on its dashboard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from workers.cluster import AUTH_MODE_ENV, AUTH_TOKEN_ENV


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
