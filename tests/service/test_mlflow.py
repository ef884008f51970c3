"""MLflow export against a real `mlflow server` (SQLite backend, artifacts served by it) on loopback:
an ended pipeline and a search mirrored by the reconciler's export, once per attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from cdsp_core import runs
from cdsp_core.ray_head import free_port
from service import store
from service.main import create_app
from service.mlflow_export import mirror
from service.settings import Settings
from tests.service.conftest import AUTH, small_spec
from tests.service.test_api import ctx_of, write_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")]
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def client_app(make_settings: Callable[..., Settings], tmp_path: Path) -> Any:
    from fastapi.testclient import TestClient

    app = create_app(make_settings(database_url=f"sqlite:///{tmp_path / 'q.db'}"))
    with TestClient(app, headers=AUTH) as c:
        yield c


def finished(client: Any, spec: dict[str, Any], **fields: Any) -> Any:
    """An experiment whose run folder is written and whose row says it ended."""
    exp = client.post("/v1/experiments", json={"spec": spec}).json()
    write_run(exp["run_dir"])
    runs.write_text(runs.join(exp["run_dir"], "result.json"), json.dumps(fields.get("result") or {}))
    with ctx_of(client.app).sessions.begin() as s:
        store.update_fields(s, exp["id"], status="succeeded", **fields)
    with ctx_of(client.app).sessions() as s:
        row = store.get(s, exp["id"])
        s.expunge(row)
    return row


def test_a_pipeline_and_a_search_are_mirrored_once(client_app: Any, mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    result = {"miou": 44.5, "pseudo_label_miou": 80.0, "checkpoint": "checkpoints/stage2-epoch002.pt"}
    exp = finished(client_app, small_spec("mirrored"), result=result)
    run_id = mirror(exp, mlflow_server, "cdsp-test")
    assert run_id is not None and mirror(exp, mlflow_server, "cdsp-test") is None  # not twice
    ml = MlflowClient(tracking_uri=mlflow_server)
    run = ml.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cdsp.experiment_id"] == exp.id
    assert run.data.params["stage2.lambda_s"] == "1.0" and run.data.params["name"] == "mirrored"
    history = ml.get_metric_history(run_id, "stage2.miou")
    assert [(m.step, m.value) for m in history] == [(1, 41.0), (2, 42.0)]
    assert run.data.metrics["final.miou"] == 44.5
    names = {a.path for a in ml.list_artifacts(run_id)} | {a.path for a in ml.list_artifacts(run_id, "figures")}
    assert {"spec.json", "result.json", "figures/miou.png"} <= names
    assert [a.path for a in ml.list_artifacts(run_id, "model")] == ["model/stage2-epoch002.pt"]

    trials = [{"trial": f"t{i}", "params": {"stage2.lambda_s": float(i)}, "miou": 50.0 + i, "status": "TERMINATED"}
              for i in range(2)]  # fmt: skip
    search = finished(client_app, small_spec("grid", kind="search"), trials=trials, result={"miou": 51.0})
    rows = [{"stage": "stage2", "epoch": 1, "trial": t["trial"], "miou": t["miou"]} for t in trials]
    runs.write_text(runs.join(search.run_dir, runs.METRICS), "".join(json.dumps(r) + "\n" for r in rows))
    parent = mirror(search, mlflow_server, "cdsp-test")
    children = ml.search_runs(
        [ml.get_experiment_by_name("cdsp-test").experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(c.data.tags["cdsp.trial"] for c in children) == ["t0", "t1"]
    for child in children:
        i = int(child.data.tags["cdsp.trial"][1:])
        assert child.data.params["stage2.lambda_s"] == str(float(i))
        assert [m.value for m in ml.get_metric_history(child.info.run_id, "stage2.miou")] == [50.0 + i]


def test_the_reconciler_exports_what_ends_when_configured(
    make_settings: Callable[..., Settings], tmp_path: Path, mlflow_server: str
) -> None:
    from fastapi.testclient import TestClient
    from mlflow.tracking import MlflowClient

    from service.reconciler import Reconciler

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'r.db'}", mlflow_tracking_uri=mlflow_server,
                             mlflow_experiment="cdsp-reconciler")  # fmt: skip
    app = create_app(settings)
    with TestClient(app, headers=AUTH) as c:
        # Not the normal end of a job: its cluster lost while it ran (metrics up to then are read first).
        exp = finished(c, small_spec("via-loop"), result={"miou": 12.5})
        ctx = ctx_of(app)
        with ctx.sessions.begin() as s:
            store.update_fields(s, exp.id, status="running", submitted_at=datetime.now(UTC))
        reconciler = Reconciler(settings, ctx.sessions, ctx.ray)
        assert reconciler.fail_submitted("lost the cluster") == [exp.id]
        assert reconciler.fail_submitted("lost the cluster") == []  # ended once: no second mirror either
    for thread in [t for t in threading.enumerate() if t.name == f"mlflow-{exp.id}"]:
        thread.join(60)
    ml = MlflowClient(tracking_uri=mlflow_server)
    deadline = time.monotonic() + 60
    while True:
        experiment = ml.get_experiment_by_name("cdsp-reconciler")
        found = ml.search_runs([experiment.experiment_id]) if experiment else []
        if found and found[0].info.status == "FAILED":
            break
        assert time.monotonic() < deadline, "the export thread did not mirror the experiment"
        time.sleep(0.5)
    assert len(found) == 1, "one attempt, one mirror"
    assert found[0].data.tags["cdsp.experiment_id"] == exp.id and found[0].data.metrics["final.miou"] == 12.5
