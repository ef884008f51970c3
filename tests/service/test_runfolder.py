"""Reading run folders: progress over the stages a spec runs, checkpoints, the worker's error line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdsp_core.spec import validate_spec
from service import runfolder
from service.dispatcher import entrypoint
from tests.service.conftest import small_spec


@pytest.mark.parametrize(
    "kind, extra, total",
    [
        ("pipeline", {}, 3 + 4),
        ("stage1", {}, 3),
        ("stage2", {"pseudo_label_dir": "pseudo"}, 4),
        ("pipeline", {"pseudo_label_dir": "pseudo"}, 4),  # external pseudo-labels: no stage 1
        ("search", {}, 3 + 4 * 3),  # stage 1 once, shared; 3 grid points of stage 2
    ],
)
def test_total_epochs_counts_the_stages_the_spec_runs(kind: str, extra: dict[str, str], total: int) -> None:
    raw = small_spec(kind=kind, **extra)
    raw["stage1"]["epochs"], raw["stage2"]["epochs"] = 3, 4
    assert runfolder.total_epochs(validate_spec(raw)) == total


def test_stage1_rounds_count_their_epochs() -> None:
    raw = small_spec(kind="pipeline")
    raw["stage1"].update(epochs=3, method="dense", rounds=3, round_epochs=2)
    raw["stage2"]["epochs"] = 4
    spec = validate_spec(raw)
    assert runfolder.total_epochs(spec) == 3 + 2 * 2 + 4
    rows = [
        {"stage": "stage1", "epoch": 3}, {"stage": "pseudo_labels", "round": 1},
        {"stage": "stage1-round2", "epoch": 2}, {"stage": "pseudo_labels", "round": 2},
        {"stage": "stage1-round3", "epoch": 1},
    ]  # fmt: skip
    assert runfolder.epochs_done(spec, rows) == (3 + 2 + 1, "stage1-round3")


def test_epoch_count_follows_the_specs_stage1_rule() -> None:
    """A pipeline whose pseudo-label terms are weighted 0 trains no stage 1, so its epochs are stage 2's."""
    raw = small_spec(kind="pipeline")
    raw["stage2"]["loss_weights"] = {"segc": 0.0, "dc": 0.0, "lorm": 0.0}
    spec = validate_spec(raw)
    assert not spec.runs_stage1 and runfolder.total_epochs(spec) == spec.stage2.epochs
    assert runfolder.total_epochs(validate_spec(small_spec(kind="pipeline"))) > spec.stage2.epochs


def test_epochs_done_takes_the_highest_epoch_per_stage_and_trial() -> None:
    spec = validate_spec(small_spec(kind="search", epochs=2))  # 2 + 2 * 3 epochs
    rows = [
        {"stage": "stage1", "epoch": 1}, {"stage": "stage1", "epoch": 2},
        {"stage": "pseudo_labels", "miou": 60.0},
        {"stage": "stage2", "epoch": 1, "trial": "a"}, {"stage": "stage2", "epoch": 2, "trial": "a"},
        {"stage": "stage2", "epoch": 1, "trial": "b"},
    ]  # fmt: skip
    assert runfolder.epochs_done(spec, rows) == (2 + 2 + 1, "stage2")
    assert runfolder.epochs_done(spec, []) == (0, None)


def test_read_a_run_folder(tmp_path: Path) -> None:
    spec = validate_spec(small_spec(epochs=1))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "stage1-epoch001.pt").write_bytes(b"x" * 10)
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"y")
    lines = [{"stage": "stage1", "epoch": 1, "loss": 0.5}, {"stage": "stage2", "epoch": 1, "miou": 50.0},
             {"stage": "stage2", "epoch": 1, "loss": 0.2}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "sta')
    (tmp_path / "result.json").write_text('{"miou": 5')  # being written
    snap = runfolder.read(str(tmp_path), spec)
    assert len(snap.rows) == 3  # the torn last line is left for the next pass
    assert snap.epochs_done == 2 and snap.stage == "stage2"
    assert snap.latest == {"stage": "stage2", "epoch": 1, "loss": 0.2, "last_miou": 50.0}
    assert snap.checkpoints == [
        {"name": "last.pt", "size": 1, "stage": None, "epoch": None},
        {"name": "stage1-epoch001.pt", "size": 10, "stage": "stage1", "epoch": 1},
    ]
    assert snap.result is None and snap.errors and snap.errors[0].startswith("result.json")


@pytest.mark.parametrize(
    "epochs, total",
    [
        ({"grid": [2, 5]}, 3 + (2 + 5) * 3),  # 2 x 3 grid: each epochs value with each lambda_c
        ({"choice": [2, 9]}, 3 + 9 * 3),  # random domains count their largest value (an upper bound)
        ({"randint": [1, 10000]}, 3 + 9999 * 3),
    ],
)
def test_a_searched_stage2_epochs_counts_in_the_total(epochs: dict[str, Any], total: int) -> None:
    """The size limit counts the epochs a search's trials may run, not the base spec's (a randint over
    epochs on a 1-epoch base slipped past MAX_TOTAL_EPOCHS)."""
    raw = small_spec(kind="search")
    raw["stage1"]["epochs"], raw["stage2"]["epochs"] = 3, 1
    raw["search"]["space"] = {"stage2.epochs": epochs, "stage2.lambda_c": {"grid": [1.0, 2.0, 3.0]}}
    assert runfolder.total_epochs(validate_spec(raw)) == total


def test_trials_and_results_of_the_wrong_shape_are_ignored_and_named(tmp_path: Path) -> None:
    """The routes read trial entries as objects and result.json's checkpoint as a path: other shapes
    are left out with the file named, never stored for a route to fail on."""
    spec = validate_spec(small_spec(epochs=1))
    (tmp_path / "trials.json").write_text("[1, 2]")
    (tmp_path / "result.json").write_text('{"checkpoint": 5}')
    snap = runfolder.read(str(tmp_path), spec)
    assert snap.trials is None and snap.result is None
    assert [e.split(":")[0] for e in snap.errors] == ["trials.json", "result.json"]
    (tmp_path / "trials.json").write_text('{"a": 1}')
    (tmp_path / "result.json").write_text('{"checkpoint": "checkpoints/stage2-epoch001.pt", "miou": 50.0}')
    snap = runfolder.read(str(tmp_path), spec)
    assert snap.trials is None and snap.errors == ["trials.json: expected a JSON list; the file is ignored"]
    assert snap.result == {"checkpoint": "checkpoints/stage2-epoch001.pt", "miou": 50.0}


def test_a_trials_file_caught_mid_write_keeps_the_stored_trials(make_settings: Any) -> None:
    """S3 writes are not atomic: a pass that reads half a trials.json keeps the trials it stored
    before (it blanked them until the next pass), and the next whole file replaces them."""
    from fastapi.testclient import TestClient

    from cdsp_core import runs
    from service import store
    from service.main import create_app
    from service.reconciler import Reconciler
    from tests.service.conftest import AUTH

    app = create_app(make_settings())
    with TestClient(app, headers=AUTH) as client:
        exp = client.post("/v1/experiments", json={"spec": small_spec(epochs=1)}).json()
        ctx = app.state.ctx
        reconciler = Reconciler(ctx.settings, ctx.sessions, ctx.ray)
        spec = validate_spec(exp["spec"])

        def ingest(text: str) -> Any:
            runs.write_text(runs.join(exp["run_dir"], runs.TRIALS), text)
            with ctx.readers() as s:
                reconciler.ingest(store.get(s, exp["id"]), spec)
            with ctx.readers() as s:
                return store.get(s, exp["id"]).trials

        whole = [{"trial": "trial_00000", "miou": 50.0, "status": "finished"}]
        assert ingest(json.dumps(whole)) == whole
        assert ingest(json.dumps(whole + whole)[:40]) == whole  # half written: kept
        assert ingest("[]") == []  # a whole file, even an empty one, is stored


def test_checkpoints_are_listed_by_stage_then_epoch(tmp_path: Path) -> None:
    """`cdsp fetch` takes the last one when there is no final checkpoint yet: epoch 1000 comes after 999."""
    (tmp_path / "checkpoints").mkdir()
    for name in ("stage2-epoch1000.pt", "stage2-epoch999.pt", "stage1-epoch002.pt", "last.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"x")
    names = [c["name"] for c in runfolder.checkpoints(str(tmp_path))]
    assert names == ["last.pt", "stage1-epoch002.pt", "stage2-epoch999.pt", "stage2-epoch1000.pt"]


def test_error_line_is_the_last_error_prefixed_line() -> None:
    logs = "starting\nerror: first\nTraceback...\nerror: dataset problems: data.root /x is not a directory\n"
    assert runfolder.error_line(logs) == "dataset problems: data.root /x is not a directory"
    assert runfolder.error_line("all fine\n") is None


def test_entrypoint_quotes_the_run_locations() -> None:
    cmd = entrypoint("python -m workers.run --spec {spec} --out {out}", "/data/my runs/exp-1")
    assert cmd == "python -m workers.run --spec '/data/my runs/exp-1/spec.yaml' --out '/data/my runs/exp-1'"
    assert entrypoint("wrap {out}", "s3://b/runs/exp-1") == "wrap s3://b/runs/exp-1"
