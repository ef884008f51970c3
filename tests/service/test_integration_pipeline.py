"""End to end with the real job: uvicorn on loopback, a local Ray head, `python -m workers.run`.

A tiny pipeline (64 px synthetic data, resnet18, one epoch per stage) is submitted over REST,
followed to succeeded, and its checkpoint downloaded and checked against its SHA-256; a dataset
root missing on the cluster fails the experiment with the worker's one-line reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from cdsp_core.runs import QUALITY_KEYS
from service.client import Client
from service.ray_head import EmbeddedHead
from tests.service.conftest import TOKEN, wait_until
from tests.service.server import ServiceProcess

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def tiny_pipeline(root: str) -> dict[str, Any]:
    return {
        "name": "tiny-pipeline",
        "kind": "pipeline",
        "data": {"root": root, "num_classes": 3, "crop_size": 64, "loader_workers": 0},
        "stage1": {"backbone": "resnet18", "epochs": 1, "batch_size": 4, "cam_scales": [1.0]},
        "stage2": {"backbone": "resnet18", "epochs": 1, "batch_size": 4, "warmup_epochs": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }


@pytest.fixture
def service(ray_head: EmbeddedHead, tmp_path: Path) -> Iterator[ServiceProcess]:
    assert ray_head.info is not None
    env = {  # the default entrypoint: python -m workers.run --spec {spec} --out {out}
        "CDSP_DATA_DIR": str(tmp_path / "cdsp-data"),
        "CDSP_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}",
        "CDSP_STORAGE": str(tmp_path / "artifacts"),
        "CDSP_RAY_ADDRESS": ray_head.info.dashboard_url,
        "CDSP_RAY_TOKEN": ray_head.info.token,
        "CDSP_API_TOKENS": TOKEN,
        "CDSP_POLL_INTERVAL": "0.5",
    }
    proc = ServiceProcess(env, tmp_path, tmp_path / "service.log")
    proc.env.pop("CDSP_JOB_ENTRYPOINT", None)  # not even from the developer's shell
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def finished(client: Client, exp_id: str, timeout: float) -> dict[str, Any]:
    done: dict[str, Any] = wait_until(
        lambda: (e := client.get(exp_id))["status"] in ("succeeded", "failed", "cancelled") and e,
        timeout,
        f"{exp_id} to finish",
        interval=1.0,
    )
    return done


def test_a_tiny_pipeline_runs_through_the_service(service: ServiceProcess, tiny_synth: Path, tmp_path: Path) -> None:
    with Client(service.url, TOKEN) as client:
        exp = client.submit(tiny_pipeline(str(tiny_synth)))
        done = finished(client, exp["id"], timeout=480)
        if done["status"] != "succeeded":
            pytest.fail(f"{done['status']}: {done['error']}\n{client.logs(exp['id'], tail=60)}")
        assert [t["to_status"] for t in done["transitions"]] == ["queued", "dispatching", "running", "succeeded"]
        assert done["progress"]["epochs_done"] == done["progress"]["epochs_total"] == 2
        result = done["result"]
        assert 0.0 <= result["miou"] <= 100.0 and len(result["per_class_iou"]) == 3
        # The pseudo-labels' quality beside the trivial label's, on all and on unscribbled pixels.
        assert all(0.0 <= result[k] <= 100.0 for k in QUALITY_KEYS)
        metrics = client.http.get(f"/v1/experiments/{exp['id']}/metrics").json()["items"]
        assert {m["stage"] for m in metrics} >= {"stage1", "pseudo_labels", "stage2"}
        assert any("miou" in m for m in metrics)
        assert "cls_map" in next(m for m in metrics if m["stage"] == "stage1")  # the classifier, per epoch
        (quality,) = [m for m in metrics if m["stage"] == "pseudo_labels"]
        assert {k: quality[k] for k in QUALITY_KEYS} == {k: result[k] for k in QUALITY_KEYS}
        name = result["checkpoint"].rsplit("/", 1)[-1]
        dest, digest = client.download_checkpoint(exp["id"], name, tmp_path / name)
        on_disk = runs.local_path(runs.join(done["run_dir"], result["checkpoint"])).read_bytes()
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == digest == hashlib.sha256(on_disk).hexdigest()
        assert runs.exists(runs.join(done["run_dir"], "logs", f"{exp['id']}.log"))


def test_a_dataset_missing_on_the_cluster_fails_before_training(service: ServiceProcess, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted" / "synthetic"  # the service cannot see it either: the cluster decides
    with Client(service.url, TOKEN) as client:
        exp = client.submit(tiny_pipeline(str(missing)))
        done = finished(client, exp["id"], timeout=180)
    assert done["status"] == "failed"
    assert str(missing) in done["error"] and "\n" not in done["error"]
    assert done["progress"]["epochs_done"] == 0
