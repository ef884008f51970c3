"""The real job (`python -m workers.run`) through the service's fault paths, on the service's own
embedded Ray head: the head lost mid-run (SIGKILL of its whole process group, as when its machine
dies), then a retry on the head the service started again."""

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
from service.client import Client
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


def stage2_epochs(client: Client, exp_id: str) -> list[int]:
    rows = client.http.get(f"/v1/experiments/{exp_id}/metrics", params={"stage": "stage2"}).json()["items"]
    return [r["epoch"] for r in rows]


def test_a_lost_head_fails_the_run_and_retry_resumes_on_the_new_one(
    embedded: ServiceProcess, tiny_synth: Path, tmp_path: Path
) -> None:
    epochs = 12
    with Client(embedded.url, TOKEN) as client:
        exp = client.submit(slow_stage2(str(tiny_synth), epochs))
        wait_until(lambda: len(stage2_epochs(client, exp["id"])) >= 2, 300, "two epochs before the loss", 1.0)
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
        done = wait_until(
            lambda: (e := client.get(exp["id"]))["status"] in ("succeeded", "failed") and e, 300, "the retry", 1.0
        )
        assert done["status"] == "succeeded", done["error"]
        after = stage2_epochs(client, exp["id"])
        resumed = after[len(done_before) :]
        assert resumed and resumed[0] > 1, after  # from the stored checkpoint, not epoch 1
        assert sorted(after) == list(range(1, epochs + 1)), after  # every epoch's metrics exactly once
