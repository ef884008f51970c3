"""Run folders under an S3 URI (moto's S3 server on loopback): what the API serves and the loops write."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from cdsp_core import runs
from cdsp_core.spec import load_spec
from service import store
from service.context import AppContext
from service.main import create_app
from service.reconciler import Reconciler
from service.settings import Settings
from tests.s3 import s3_bucket, s3_env, s3_server, s3_storage  # noqa: F401  (fixtures, used by name)
from tests.service.conftest import AUTH, small_spec, wait_until


def test_checkpoints_and_metrics_from_s3(make_settings: Callable[..., Settings], s3_storage: str) -> None:  # noqa: F811
    app = create_app(make_settings(storage=s3_storage))
    with TestClient(app, headers=AUTH) as client:
        exp = client.post("/v1/experiments", json={"spec": small_spec(epochs=1)}).json()
        run = exp["run_dir"]
        assert run.startswith(f"{s3_storage}/experiments/exp-")
        weights = bytes(range(256)) * 4096  # 1 MiB: more than one streamed chunk
        runs.write_bytes(runs.join(run, "checkpoints", "stage2-epoch001.pt"), weights)
        rows = [{"stage": "stage1", "epoch": 1, "loss": 0.5}, {"stage": "stage2", "epoch": 1, "miou": 33.0}]
        runs.write_text(runs.join(run, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        listing = client.get(f"/v1/experiments/{exp['id']}/checkpoints").json()
        assert [(c["name"], c["size"]) for c in listing["items"]] == [("stage2-epoch001.pt", len(weights))]
        r = client.get(listing["items"][0]["url"])
        assert r.status_code == 200 and r.content == weights
        assert r.headers["x-checksum-sha256"] == hashlib.sha256(weights).hexdigest()
        ctx: AppContext = app.state.ctx
        with ctx.readers() as s:
            row = store.get(s, exp["id"])
        Reconciler(ctx.settings, ctx.sessions, ctx.ray).ingest(row, load_spec(exp["spec"]))
        body = client.get(f"/v1/experiments/{exp['id']}").json()
        assert body["progress"]["epochs_done"] == 2 and body["latest_metrics"]["miou"] == 33.0


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_loops_write_spec_and_logs_to_s3(ray_settings: Callable[..., Settings], s3_storage: str) -> None:  # noqa: F811
    """A job that writes nothing: the spec and the archived logs are the service's own writes."""
    settings = ray_settings(storage=s3_storage, job_entrypoint="echo the job ran with --out {out}")
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as client:
        exp = client.post("/v1/experiments", json={"spec": small_spec("to-s3")}).json()
        done = wait_until(
            lambda: (e := client.get(f"/v1/experiments/{exp['id']}").json())["status"] in ("succeeded", "failed") and e,
            60,
            "the job to end",
        )
    assert done["status"] == "failed"
    assert done["error"] == "the job exited 0 but wrote no usable result.json to the run folder"
    assert runs.read_text(runs.join(done["run_dir"], "spec.yaml")).startswith("name: to-s3")
    log = runs.read_text(runs.join(done["run_dir"], "logs", f"{exp['id']}.log"))
    assert f"the job ran with --out {done['run_dir']}" in log
