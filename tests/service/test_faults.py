"""The real job (`python -m workers.run`) through the service's fault paths: cancel, retry after a
cancel, the service SIGKILLed mid-run and restarted (on the session's shared Ray head), and the
head lost mid-run (SIGKILL of the service's own embedded head's process group, as when its machine
dies), then a retry on the head the service started again. (The demo path: test_demo.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cdsp_core import runs
from cdsp_core.ray_head import pid_alive
from service.client import Client
from service.ray_head import EmbeddedHead
from tests.service.conftest import AUTH, TOKEN, wait_until
from tests.service.server import ServiceProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def slow_stage2(root: str, epochs: int) -> dict[str, Any]:
    """Stage 2 only (the ground truth as external pseudo-labels), long enough to be interrupted."""
    return {
        "name": "long-stage2",
        "kind": "stage2",
        "data": {"root": root, "num_classes": 3, "crop_size": 64, "loader_workers": 0,
                 "pseudo_label_dir": "SegmentationClassAug"},
        "stage2": {"backbone": "resnet18", "epochs": epochs, "batch_size": 4, "warmup_epochs": 0,
                   "keep_checkpoints": 100},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ServiceProcess]:
    """The service with its own Ray head (no CDSP_RAY_ADDRESS) and the real job entrypoint."""
    env = {
        "CDSP_DATA_DIR": str(tmp_path / "cdsp-data"),
        "CDSP_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "CDSP_STORAGE": str(tmp_path / "artifacts"),
        "CDSP_API_TOKENS": TOKEN,
        "CDSP_POLL_INTERVAL": "0.5",
        "CDSP_RAY_NUM_CPUS": "2",
        "CDSP_RAY_LOST_AFTER": "5",
        "CDSP_LOG_MIRROR_INTERVAL": "1",
    }
    proc = ServiceProcess(env, tmp_path, tmp_path / "service.log")
    for var in ("CDSP_JOB_ENTRYPOINT", "CDSP_RAY_ADDRESS", "CDSP_RAY_TOKEN", "RAY_ADDRESS"):
        proc.env.pop(var, None)
    proc.start(timeout=180)  # the embedded head starts first
    try:
        yield proc
    finally:
        proc.stop(timeout=60)


def job_worker_pids(ray_head: EmbeddedHead, submission_id: str) -> list[int]:
    """Pids of the live Ray worker processes of a Ray job (the state API of the head's dashboard)."""
    assert ray_head.info is not None
    url, headers = ray_head.info.dashboard_url, {"Authorization": f"Bearer {ray_head.info.token}"}
    job_id = httpx.get(f"{url}/api/jobs/{submission_id}", headers=headers, timeout=10).json()["job_id"]
    params = {"detail": "true", "filter_keys": "job_id", "filter_predicates": "=", "filter_values": job_id}
    answer = httpx.get(f"{url}/api/v0/actors", params=params, headers=headers, timeout=10).json()
    assert answer.get("data"), answer
    # Detached actors (Ray's own cluster-wide singletons, such as the autoscaling coordinator Ray Train
    # starts on first use) belong to the cluster, not to the job.
    actors = answer["data"]["result"]["result"]
    return [a["pid"] for a in actors if a["state"] == "ALIVE" and a.get("pid") and not a.get("is_detached")]


def stage2_epochs(client: Client, exp_id: str) -> list[int]:
    rows = client.http.get(f"/v1/experiments/{exp_id}/metrics", params={"stage": "stage2"}).json()["items"]
    return [r["epoch"] for r in rows]


def running_for_two_epochs(client: Client, root: Path, epochs: int) -> dict[str, Any]:
    """A submitted `slow_stage2` run once its first two epochs are recorded."""
    exp = client.submit(slow_stage2(str(root), epochs))
    wait_until(lambda: len(stage2_epochs(client, exp["id"])) >= 2, 300, "two epochs", 0.5)
    return exp


def ended(client: Client, exp_id: str, timeout: float = 300) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (e := client.get(exp_id))["status"] in ("succeeded", "failed") and e, timeout, f"{exp_id} to end", 1.0
    )
    return found


def test_a_lost_head_fails_the_run_and_retry_resumes_on_the_new_one(
    embedded: ServiceProcess, tiny_synth: Path, tmp_path: Path
) -> None:
    epochs = 12
    with Client(embedded.url, TOKEN) as client:
        exp = running_for_two_epochs(client, tiny_synth, epochs)
        head = json.loads((tmp_path / "cdsp-data" / "ray-head.json").read_text())
        os.killpg(head["pid"], signal.SIGKILL)  # the head's machine is gone: GCS, raylet, workers, driver
        lost_at = time.monotonic()

        readiness = wait_until(
            lambda: (r := httpx.get(f"{embedded.url}/readyz", headers=AUTH, timeout=5)).status_code == 503 and r.json(),
            30, "/readyz to report the lost cluster", 0.2,
        )  # fmt: skip
        assert "unreachable" in readiness["ray"] and readiness["ray_address"] == head["dashboard_url"]
        failed = wait_until(
            lambda: (e := client.get(exp["id"]))["status"] == "failed" and e, 120, "the run to fail as lost", 0.5
        )
        print(f"failed {time.monotonic() - lost_at:.1f} s after the head was killed: {failed['error']}")
        assert f"lost the Ray cluster at {head['dashboard_url']}" in failed["error"], failed["error"]
        assert client.list()["total"] == 1  # the API kept answering throughout
        done_before = stage2_epochs(client, exp["id"])
        log = runs.local_path(runs.join(failed["run_dir"], "logs", f"{exp['id']}.log")).read_text()
        assert "stage2 epoch 1/" in log  # the job's log up to the loss outlived the head

        ready = f"{embedded.url}/readyz"
        wait_until(lambda: httpx.get(ready, headers=AUTH, timeout=5).status_code == 200, 180, "a new head", 1.0)
        client.retry(exp["id"])
        done = ended(client, exp["id"])
        assert done["status"] == "succeeded", done["error"]
        after = stage2_epochs(client, exp["id"])
        resumed = after[len(done_before) :]
        assert resumed and resumed[0] > 1, after  # from the stored checkpoint, not epoch 1
        assert sorted(after) == list(range(1, epochs + 1)), after  # every epoch's metrics exactly once


def test_cancel_stops_the_real_job_and_retry_resumes_it(
    on_shared_head: ServiceProcess, ray_head: EmbeddedHead, tiny_synth: Path
) -> None:
    epochs = 12
    with Client(on_shared_head.url, TOKEN) as client:
        exp = running_for_two_epochs(client, tiny_synth, epochs)
        pids = job_worker_pids(ray_head, exp["id"])
        assert len(pids) >= 2  # the Ray Train worker and the trainer's controller of this job
        client.cancel(exp["id"])
        done = wait_until(lambda: (e := client.get(exp["id"]))["status"] == "cancelled" and e, 90, "cancelled", 0.5)
        assert [t["to_status"] for t in done["transitions"]][-1] == "cancelled"
        jobs = httpx.get(f"{ray_head.info.dashboard_url}/api/jobs/{exp['id']}", headers=ray_head_auth(ray_head))
        assert jobs.json()["status"] == "STOPPED"
        deadline = time.monotonic() + 60
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [(p, process_line(p)) for p in pids if pid_alive(p)]
        assert not left, left
        rows = stage2_epochs(client, exp["id"])
        metrics_file = Path(done["run_dir"]) / "metrics.jsonl"
        lines = metrics_file.read_text().count("\n")
        time.sleep(3)
        assert stage2_epochs(client, exp["id"]) == rows and metrics_file.read_text().count("\n") == lines

        client.retry(exp["id"])
        done = ended(client, exp["id"])
        assert done["status"] == "succeeded", done["error"]
        after = stage2_epochs(client, exp["id"])
        assert after[len(rows)] == rows[-1] + 1, after  # the next epoch after the stored checkpoint
        assert sorted(after) == list(range(1, epochs + 1)), after


def test_the_service_killed_mid_run_and_restarted_finishes_the_run_once(
    on_shared_head: ServiceProcess, tiny_synth: Path
) -> None:
    epochs = 10
    with Client(on_shared_head.url, TOKEN) as client:
        exp = running_for_two_epochs(client, tiny_synth, epochs)
    on_shared_head.kill()  # SIGKILL: no shutdown runs; the job goes on on the cluster
    time.sleep(3)
    on_shared_head.start()
    with Client(on_shared_head.url, TOKEN) as client:
        done = ended(client, exp["id"])
        assert done["status"] == "succeeded", done["error"]
        assert client.list()["total"] == 1
        assert [t["to_status"] for t in done["transitions"]] == ["queued", "dispatching", "running", "succeeded"]
        assert stage2_epochs(client, exp["id"]) == list(range(1, epochs + 1))  # every epoch's row exactly once
        assert done["ray"]["submission_id"] == exp["id"]  # followed, never submitted again


def ray_head_auth(ray_head: EmbeddedHead) -> dict[str, str]:
    assert ray_head.info is not None
    return {"Authorization": f"Bearer {ray_head.info.token}"}


def process_line(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "gone"
    return f"{stat} {cmd}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_cdsp_serve_stops_the_head_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM (a service manager) or Ctrl-C of `cdsp serve`: its embedded Ray head goes with it."""
    import shutil
    import subprocess
    import sys

    from cdsp_core.ray_head import free_port

    port, data = free_port(), tmp_path / "cdsp-data"
    env = {**os.environ, "CDSP_DATA_DIR": str(data), "CDSP_API_TOKENS": TOKEN, "CDSP_RAY_NUM_CPUS": "1"}
    for var in ("CDSP_RAY_ADDRESS", "CDSP_RAY_TOKEN", "RAY_ADDRESS", "CDSP_DATABASE_URL", "CDSP_STORAGE"):
        env.pop(var, None)
    cdsp = shutil.which("cdsp", path=str(Path(sys.executable).parent))
    assert cdsp is not None
    serve = subprocess.Popen([cdsp, "serve", "--port", str(port), "--log-level", "warning"], cwd=tmp_path, env=env)
    try:
        wait_until(lambda: (data / "ray-head.json").exists() and _healthy(port), 180, "cdsp serve to start", 0.5)
        head = json.loads((data / "ray-head.json").read_text())
        assert pid_alive(head["pid"])
        serve.send_signal(sig)
        assert serve.wait(timeout=90) is not None
        wait_until(lambda: not pid_alive(head["pid"], group=True), 30, "the head's processes to exit", 0.5)
        assert not (data / "ray-head.json").exists()  # a clean stop: nothing for the next start to adopt
    finally:
        if serve.poll() is None:
            serve.kill()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
