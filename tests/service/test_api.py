"""REST API against a real SQLite file and PostgreSQL, Ray unreachable (nothing is dispatched)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cdsp_core import runs
from service import store
from service.context import AppContext
from service.main import create_app
from service.settings import Settings
from service.states import Status
from tests.service.conftest import AUTH, small_spec


@pytest.fixture
def app(make_settings: Callable[..., Settings], db_url: str) -> FastAPI:
    return create_app(make_settings(database_url=db_url))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as c:
        yield c


def ctx_of(app: FastAPI) -> AppContext:
    ctx: AppContext = app.state.ctx
    return ctx


def submit(client: TestClient, spec: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    r = client.post("/v1/experiments", json={"spec": spec or small_spec(), **kw})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def test_create_answers_201_with_location_and_a_queued_row(client: TestClient) -> None:
    r = client.post("/v1/experiments", json={"spec": small_spec("first", epochs=3), "priority": 7})
    assert r.status_code == 201
    body = r.json()
    assert r.headers["location"] == f"/v1/experiments/{body['id']}"
    assert body["status"] == "queued" and body["priority"] == 7 and body["name"] == "first"
    assert body["progress"] == {"epochs_done": 0, "epochs_total": 6, "fraction": 0.0, "stage": None}
    assert body["transitions"][0]["to_status"] == "queued"
    assert body["run_dir"].endswith(f"/experiments/{body['id']}")
    assert body["ray"] == {"submission_id": None, "dashboard_url": None}
    got = client.get(r.headers["location"])
    assert got.status_code == 200 and got.json()["id"] == body["id"]


def test_idempotency_key_returns_the_first_experiment(client: TestClient) -> None:
    headers = {"Idempotency-Key": "job-42"}
    first = client.post("/v1/experiments", json={"spec": small_spec()}, headers=headers)
    again = client.post("/v1/experiments", json={"spec": small_spec()}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert client.get("/v1/experiments").json()["total"] == 1
    other = client.post("/v1/experiments", json={"spec": small_spec("changed")}, headers=headers)
    assert other.status_code == 422
    assert other.json()["detail"][0]["type"] == "idempotency_key_reused"


def test_spec_errors_answer_422_with_field_paths(client: TestClient) -> None:
    spec = small_spec()
    spec["stage2"]["epochs"] = 0
    spec["stage2"]["lambda_x"] = 1
    r = client.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 422
    fields = {e["field"]: e["msg"] for e in r.json()["detail"]}
    assert "greater than or equal to 1" in fields["stage2.epochs"]
    assert "Extra inputs are not permitted" in fields["stage2.lambda_x"]
    spec = small_spec()
    spec["resources"] = {"num_workers": 3}  # batch 4 is not divisible by 3: a whole-spec error
    r = client.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert "not divisible by resources.num_workers=3" in detail["msg"] and not detail["msg"].startswith("Value error")
    assert detail["field"] == "stage1.batch_size"  # filed under the key the rule names, not the whole spec
    assert client.post("/v1/experiments", json={"spec": small_spec(), "colour": 1}).status_code == 422


def test_a_visible_dataset_root_without_the_layout_answers_422(client: TestClient, tmp_path: Path) -> None:
    root = tmp_path / "half-dataset"
    (root / "JPEGImages").mkdir(parents=True)
    r = client.post("/v1/experiments", json={"spec": small_spec(root=str(root))})
    assert r.status_code == 422
    errors = r.json()["detail"]
    fields = {e["field"] for e in errors}
    assert {"data.scribble_dir", "data.gt_dir", "data.train_list", "data.val_list"} <= fields
    assert all(e["type"] == "dataset_layout" for e in errors)
    assert any("pascal_2012_scribble" in e["msg"] for e in errors)
    assert client.get("/v1/experiments").json()["total"] == 0


def test_a_complete_dataset_root_is_accepted(client: TestClient, tiny_synth: Path) -> None:
    body = submit(client, small_spec(root=str(tiny_synth)))
    assert body["status"] == "queued"


def test_list_filters_and_paginates(client: TestClient) -> None:
    ids = [submit(client, small_spec(f"n{i}", kind="search" if i == 3 else "pipeline"))["id"] for i in range(4)]
    page = client.get("/v1/experiments", params={"limit": 2}).json()
    assert page["total"] == 4 and [e["id"] for e in page["items"]] == ids[::-1][:2]
    page2 = client.get("/v1/experiments", params={"limit": 2, "offset": 2}).json()
    assert [e["id"] for e in page2["items"]] == ids[::-1][2:]
    assert [e["id"] for e in client.get("/v1/experiments", params={"kind": "search"}).json()["items"]] == [ids[3]]
    assert client.get("/v1/experiments", params={"name": "n1"}).json()["items"][0]["id"] == ids[1]
    client.post(f"/v1/experiments/{ids[0]}/cancel")
    r = client.get("/v1/experiments", params=[("status", "cancelled"), ("status", "failed")])
    assert [e["id"] for e in r.json()["items"]] == [ids[0]]
    bad = client.get("/v1/experiments", params={"status": "sleeping"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "status.0"
    assert client.get("/v1/experiments", params={"limit": 0}).status_code == 422


def test_unknown_ids_answer_404_naming_the_id(client: TestClient) -> None:
    for path in ("", "/metrics", "/checkpoints", "/logs", "/trials", "/figures"):
        r = client.get(f"/v1/experiments/exp-000000000000{path}")
        assert r.status_code == 404, path
        assert "exp-000000000000" in r.json()["detail"]
    assert client.post("/v1/experiments/exp-000000000000/cancel").status_code == 404
    assert client.get("/v1/experiments/bad%20id").status_code == 422


def test_cancel_and_retry_follow_the_state_machine(client: TestClient) -> None:
    exp_id = submit(client)["id"]
    assert client.post(f"/v1/experiments/{exp_id}/retry").status_code == 409  # queued: nothing to retry
    r = client.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = client.post(f"/v1/experiments/{exp_id}/cancel")
    assert again.status_code == 409
    assert again.json()["status"] == "cancelled" and "cannot cancel" in again.json()["detail"]
    r = client.post(f"/v1/experiments/{exp_id}/retry")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "queued" and body["attempt"] == 1 and body["finished_at"] is None
    assert [t["to_status"] for t in body["transitions"]] == ["queued", "cancelled", "queued"]
    assert body["transitions"][-1]["attempt"] == 1


def test_cancel_of_a_dispatched_experiment_is_asynchronous(app: FastAPI, client: TestClient) -> None:
    exp_id = submit(client)["id"]
    sessions = ctx_of(app).sessions
    with sessions.begin() as s:
        assert store.transition(s, exp_id, Status.dispatching, "claimed", "test")
    r = client.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "dispatching" and r.json()["cancel_requested"] is True
    with sessions.begin() as s:
        store.transition(s, exp_id, Status.succeeded, "won the race", "test")
    assert client.post(f"/v1/experiments/{exp_id}/retry").status_code == 409  # succeeded is final


def write_run(run_dir: str) -> dict[str, bytes]:
    """A finished run folder, as the workers leave it."""
    files = {
        "checkpoints/stage2-epoch002.pt": b"\x80weights" * 5000,
        "checkpoints/stage1-epoch002.pt": b"\x80cam" * 100,
        "figures/miou.png": b"\x89PNG\r\n\x1a\nfake",
    }
    for rel, data in files.items():
        runs.write_bytes(runs.join(run_dir, rel), data)
    rows = [{"stage": "stage2", "epoch": e, "epochs": 2, "loss": 1.0 / e, "miou": 40.0 + e} for e in (1, 2)]
    runs.write_text(runs.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    return files


def test_checkpoints_are_listed_and_streamed_with_length_and_sha256(app: FastAPI, client: TestClient) -> None:
    exp = submit(client)
    files = write_run(exp["run_dir"])
    listing = client.get(f"/v1/experiments/{exp['id']}/checkpoints").json()
    names = [c["name"] for c in listing["items"]]
    assert names == ["stage1-epoch002.pt", "stage2-epoch002.pt"]
    assert listing["items"][1]["stage"] == "stage2" and listing["items"][1]["epoch"] == 2
    data = files["checkpoints/stage2-epoch002.pt"]
    r = client.get(listing["items"][1]["url"])
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
    missing = client.get(f"/v1/experiments/{exp['id']}/checkpoints/stage2-epoch009.pt")
    assert missing.status_code == 404 and "stage2-epoch009.pt" in missing.json()["detail"]
    escapes = (
        "..%2F..%2Fspec.yaml", "%2E%2E", "spec.yaml", ".hidden.pt", "%2Fetc%2Fhostname", "..%2F..%2Fx.pt",
        "%2E%2E%2Fcheckpoints%2Fstage2-epoch002.pt", "..%252F..%252Fx.pt", "x%00.pt", "%2Ftmp%2Fx.png",
    )  # fmt: skip
    for bad in escapes:  # encoded `..`, absolute paths, double encoding, NUL: never a file outside the folder
        for kind in ("checkpoints", "figures"):
            r = client.get(f"/v1/experiments/{exp['id']}/{kind}/{bad}")
            assert r.status_code in (404, 422), (kind, bad, r.status_code)
    fig = client.get(f"/v1/experiments/{exp['id']}/figures/miou.png")
    assert fig.status_code == 200 and fig.headers["content-type"] == "image/png"
    assert fig.content == files["figures/miou.png"]
    assert client.get(f"/v1/experiments/{exp['id']}/figures").json()["items"] == ["miou.png"]


def test_metrics_and_trials_come_from_the_database(app: FastAPI, client: TestClient) -> None:
    exp = submit(client, small_spec("grid", kind="search"))
    trials = [{"trial": f"t{i}", "params": {"stage2.lambda_s": i}, "miou": m, "status": "TERMINATED"}
              for i, m in enumerate([50.0, 61.5, 58.0])]  # fmt: skip
    rows = [{"stage": "stage2", "epoch": 1, "trial": "t0", "loss": 0.9}, {"stage": "stage2", "epoch": 2, "trial": "t0"}]
    with ctx_of(app).sessions.begin() as s:
        store.sync_metric_rows(s, exp["id"], rows, 0)
        store.update_fields(s, exp["id"], trials=trials, metrics_count=2)
    metrics = client.get(f"/v1/experiments/{exp['id']}/metrics").json()["items"]
    assert [(m["seq"], m["epoch"]) for m in metrics] == [(0, 1), (1, 2)]
    assert client.get(f"/v1/experiments/{exp['id']}/metrics", params={"since": 1}).json()["items"][0]["seq"] == 1
    body = client.get(f"/v1/experiments/{exp['id']}/trials").json()
    assert len(body["trials"]) == 3 and body["best"]["trial"] == "t1"
    pipeline = submit(client)
    r = client.get(f"/v1/experiments/{pipeline['id']}/trials")
    assert r.status_code == 404 and "not a search" in r.json()["detail"]


def test_ray_unreachable_keeps_experiments_queued_and_readyz_says_why(
    make_settings: Callable[..., Settings], db_url: str
) -> None:
    app = create_app(make_settings(database_url=db_url, background=True))
    with TestClient(app, headers=AUTH) as client:
        exp_id = submit(client)["id"]
        ctx_of(app).loop.pass_once()  # type: ignore[union-attr]
        r = client.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["database"] is None
        assert "unreachable" in body["ray"] and "127.0.0.1:9" in body["ray"]
        assert client.get(f"/v1/experiments/{exp_id}").json()["status"] == "queued"
        logs = client.get(f"/v1/experiments/{exp_id}/logs")
        assert logs.status_code == 200 and logs.text == ""


def test_prometheus_metrics(client: TestClient) -> None:
    submit(client)
    exp_id = submit(client)["id"]
    client.post(f"/v1/experiments/{exp_id}/cancel")
    text = client.get("/metrics").text
    assert "cdsp_queue_depth 1.0" in text
    assert "cdsp_experiments_running 0.0" in text
    assert 'cdsp_experiments_finished{status="cancelled"} 1.0' in text
    assert 'cdsp_http_request_duration_seconds_count{method="POST",route="/v1/experiments",status="201"} 2.0' in text
    assert 'route="/v1/experiments/{experiment_id}/cancel"' in text


def test_healthz_needs_no_token(app: FastAPI) -> None:
    with TestClient(app) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").status_code == 401


def test_absurdly_long_experiments_are_rejected_with_the_field(client: TestClient) -> None:
    spec = small_spec()
    spec["stage1"]["epochs"] = 7_020_047_438_001_776_623_616  # found by schemathesis: overflowed a column
    r = client.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "stage1.epochs"
    assert "less than or equal to 10000" in r.json()["detail"][0]["msg"]  # the spec's bound (MAX_EPOCHS)
    search = small_spec("many", kind="search")  # every value within its bound, too many epochs together
    search["search"]["num_samples"] = 10_000
    search["stage2"]["epochs"] = 1_000
    r = client.post("/v1/experiments", json={"spec": search})
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "search.space"
    assert "at most 1000000" in r.json()["detail"][0]["msg"]


def test_logs_of_a_dispatched_experiment_answer_503_while_ray_is_down(app: FastAPI, client: TestClient) -> None:
    exp_id = submit(client)["id"]
    with ctx_of(app).sessions.begin() as s:
        store.transition(s, exp_id, Status.dispatching, "claimed", "test", submission_id=exp_id)
    r = client.get(f"/v1/experiments/{exp_id}/logs")
    assert r.status_code == 503 and "Ray is unavailable" in r.json()["detail"]


@pytest.mark.timeout(60)
def test_following_the_logs_of_an_ended_run_whose_logs_were_never_archived_ends(
    app: FastAPI, client: TestClient
) -> None:
    """A run failed as lost with its cluster before its logs were copied: with Ray down nothing more can
    come, so `logs?follow` ends with a line saying so (it used to send keep-alives for ever)."""
    exp_id = submit(client)["id"]
    with ctx_of(app).sessions.begin() as s:
        store.transition(s, exp_id, Status.dispatching, "claimed", "test", submission_id=exp_id)
        store.transition(s, exp_id, Status.failed, "Ray cluster lost", "test", error="lost")
    r = client.get(f"/v1/experiments/{exp_id}/logs", params={"follow": "true"})
    assert r.status_code == 200
    assert r.text.startswith(f"[no more logs: experiment {exp_id} has ended and its logs were not archived")


def test_a_checkpoint_rotated_away_during_its_download_answers_404(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keep_checkpoints` may delete a checkpoint between the route's check and its size read."""
    exp = submit(client)
    write_run(exp["run_dir"])
    real_size = runs.size

    def rotated_first(location: str) -> int:
        runs.remove(location)  # the rotation happens right now
        return real_size(location)

    monkeypatch.setattr(runs, "size", rotated_first)
    r = client.get(f"/v1/experiments/{exp['id']}/checkpoints/stage2-epoch002.pt")
    assert r.status_code == 404 and "stage2-epoch002.pt" in r.json()["detail"]


def test_a_body_over_the_limit_is_refused_with_413_before_parsing(client: TestClient) -> None:
    huge = b'{"spec": {"name": "' + b"x" * (20 << 20) + b'"}}'  # 20 MB
    r = client.post("/v1/experiments", content=huge, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts the bytes as they come
        yield b'{"spec": {"name": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}}'

    r = client.post("/v1/experiments", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/v1/experiments", headers=AUTH).json()["total"] == 0  # nothing was stored


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"spec": {"stage2": {"lr": Infinity}}}', "stage2.lr"),
        ('{"spec": {"stage2": {"lambda_s": NaN}}}', "stage2.lambda_s"),
        ('{"spec": {"stage2": {"loss_weights": {"ds": Infinity}}}}', "stage2.loss_weights.ds"),
        ('{"spec": {"stage1": {"cam_scales": [NaN]}}}', "stage1.cam_scales.0"),
        ('{"spec": {"data": {"crop_size": 100000}}}', "data.crop_size"),
        ('{"spec": {"stage2": {"batch_size": 1000000000}}}', "stage2.batch_size"),
        ('{"spec": {"resources": {"cpus_per_worker": 1000000.0}}}', "resources.cpus_per_worker"),
        ('{"spec": {"seed": 1180591620717411303424}}', "seed"),
    ],
)
def test_hostile_spec_values_get_422_naming_the_field(client: TestClient, body: str, field: str) -> None:
    r = client.post("/v1/experiments", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert field in [e["field"] for e in r.json()["detail"]]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train_list": "/etc/hostname"}, "data.train_list"),
        ({"val_list": "../../etc/hostname"}, "data.val_list"),
        ({"scribble_dir": "/tmp"}, "data.scribble_dir"),
        ({"pseudo_label_dir": "../elsewhere"}, "data.pseudo_label_dir"),
    ],
)
def test_dataset_files_outside_the_root_are_refused_without_reading_them(
    client: TestClient, tiny_synth: Path, data: dict[str, str], field: str
) -> None:
    spec = small_spec(root=str(tiny_synth))
    spec["data"].update(data)
    r = client.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]] == [field]
    assert "inside data.root" in r.json()["detail"][0]["msg"]


def test_a_list_linked_out_of_the_dataset_is_not_read(client: TestClient, tiny_synth: Path, tmp_path: Path) -> None:
    """A symlink inside the root that points outside it: refused by the layout check, and no word of the
    file it points to appears in the answer (it used to come back as `.../JPEGImages/<word>.jpg is missing`)."""
    root = tmp_path / "linked"
    shutil.copytree(tiny_synth, root)
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-do-not-echo\n")
    (root / "ImageSets/SegmentationAug/train.txt").unlink()
    (root / "ImageSets/SegmentationAug/train.txt").symlink_to(secret)
    r = client.post("/v1/experiments", json={"spec": small_spec(root=str(root))})
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["detail"]] == ["data.train_list"]
    assert "resolves outside data.root" in r.text and "hunter2" not in r.text


def test_dataset_roots_limit_where_datasets_may_live(
    make_settings: Callable[..., Settings], tiny_synth: Path, tmp_path: Path
) -> None:
    allowed = tmp_path / "datasets"
    shutil.copytree(tiny_synth, allowed / "tiny")
    app = create_app(make_settings(dataset_roots=str(allowed)))
    with TestClient(app, headers=AUTH) as client:
        r = client.post("/v1/experiments", json={"spec": small_spec(root=str(tiny_synth))})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "data.root"
        assert "CDSP_DATASET_ROOTS" in r.json()["detail"][0]["msg"]
        outside = {**small_spec(root=str(allowed / "tiny")), "kind": "stage2"}
        outside["data"]["pseudo_label_dir"] = str(tiny_synth / "SegmentationClassAug")
        r = client.post("/v1/experiments", json={"spec": outside})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "data.pseudo_label_dir"
        maps = small_spec(root=str(allowed / "tiny"))
        maps["data"]["distance_map_dir"] = "/etc"  # workers would read <root> / "/etc", which is /etc
        r = client.post("/v1/experiments", json={"spec": maps})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "data.distance_map_dir"
        assert "CDSP_DATASET_ROOTS" in r.json()["detail"][0]["msg"]
        maps["data"]["distance_map_dir"] = str(allowed / "tiny" / "maps")  # absolute, inside: accepted
        assert client.post("/v1/experiments", json={"spec": maps}).status_code == 201
        assert client.post("/v1/experiments", json={"spec": small_spec(root=str(allowed / "tiny"))}).status_code == 201
