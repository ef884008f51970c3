"""Run-folder helpers on local paths (remote URIs are covered by the S3 tests)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from cdsp_core import runs


@pytest.mark.parametrize(
    ("location", "remote"),
    [
        ("s3://bucket/prefix", True),
        ("memory://x", True),
        ("gs://b/k", True),
        ("/tmp/run", False),
        ("relative/run", False),
        ("file:///tmp/run", False),
        ("C:/runs/x", False),  # a Windows drive letter is not a scheme
    ],
)
def test_is_remote(location, remote):
    assert runs.is_remote(location) is remote


def test_join():
    assert runs.join("s3://bucket/prefix/", "checkpoints", "/a.pt") == "s3://bucket/prefix/checkpoints/a.pt"
    assert runs.join("/tmp/run", "", "result.json") == "/tmp/run/result.json"
    assert runs.join("runs/x") == "runs/x"


def test_local_path(tmp_path):
    assert runs.local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert runs.local_path(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="not a local path"):
        runs.local_path("s3://b/k")


def test_write_is_atomic_and_reads_back(tmp_path):
    target = runs.join(str(tmp_path), "deep", "er", runs.RESULT)
    runs.write_text(target, json.dumps({"miou": 50.0}))
    assert runs.read_json(target) == {"miou": 50.0}
    runs.write_bytes(target, b'{"miou": 61.5}')
    assert runs.read_bytes(target) == b'{"miou": 61.5}'
    assert runs.read_text(f"file://{target}") == '{"miou": 61.5}'
    assert runs.exists(target) and runs.size(target) == 14
    assert sorted(p.name for p in (tmp_path / "deep/er").iterdir()) == ["result.json"], "no temp file left"
    assert b"".join(runs.iter_chunks(target, chunk=4)) == b'{"miou": 61.5}'


def test_listdir(tmp_path):
    assert runs.listdir(str(tmp_path / "nope")) == []
    for name in ("b.pt", "a.pt"):
        runs.write_text(runs.join(str(tmp_path), runs.CHECKPOINTS, name), "x")
    (tmp_path / "checkpoints" / "sub").mkdir()
    assert runs.listdir(runs.join(str(tmp_path), runs.CHECKPOINTS)) == ["a.pt", "b.pt", "sub"]


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / runs.METRICS
    assert runs.read_jsonl(str(path)) == []
    path.write_text('{"stage": 2, "epoch": 1}\n\n{"stage": 2, "epoch": 2, "miou": 40.5}\n{"stage": 2, "ep')
    assert runs.read_jsonl(str(path)) == [{"stage": 2, "epoch": 1}, {"stage": 2, "epoch": 2, "miou": 40.5}]


def test_read_json_absent_is_none(tmp_path):
    assert runs.read_json(str(tmp_path / "result.json")) is None
    assert not runs.exists(str(tmp_path / "result.json"))


def test_upload_and_download_a_folder(tmp_path):
    src = tmp_path / "src"
    (src / "figures").mkdir(parents=True)
    (src / "spec.yaml").write_text("name: x\n")
    (src / "figures" / "curve.png").write_bytes(b"\x89PNG")
    dst = str(tmp_path / "store" / "run1")
    runs.upload(src, dst)
    assert (tmp_path / "store/run1/figures/curve.png").read_bytes() == b"\x89PNG"
    runs.upload(src / "spec.yaml", runs.join(dst, "copy", "spec.yaml"))
    assert runs.read_text(runs.join(dst, "copy", "spec.yaml")) == "name: x\n"
    runs.upload(src, str(src))  # onto itself: a no-op, not an error
    back = runs.download(dst, tmp_path / "back")
    assert back == tmp_path / "back"
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == [
        "copy/spec.yaml",
        "figures/curve.png",
        "spec.yaml",
    ]
    one = runs.download(runs.join(dst, "spec.yaml"), tmp_path / "x" / "y" / "spec.yaml")
    assert one.read_text() == "name: x\n"


def test_storage_options_only_for_s3(monkeypatch):
    monkeypatch.setenv("CDSP_S3_ENDPOINT", "http://127.0.0.1:9000")
    assert runs.storage_options("s3://b/k")["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert "client_kwargs" not in runs.storage_options("/tmp/x")


def test_run_result_is_the_one_shape_of_result_json(tmp_path):
    result = runs.RunResult("exp", "pipeline", epochs={"stage1": 3})
    result.set_quality({"pseudo_label_miou": 80.0, "trivial_label_miou": 40.0, "other": 1})
    result.set_final({"miou": 55.5, "per_class_iou": [90.0, 21.0], "checkpoint": "checkpoints/stage2-epoch002.pt"})
    written = runs.write_result(str(tmp_path), result)
    assert runs.read_json(str(tmp_path / runs.RESULT)) == written
    assert written["miou"] == 55.5 and written["pseudo_label_miou"] == 80.0 and "other" not in written
    assert set(runs.QUALITY_KEYS) <= set(written) and written["pseudo_label_unscribbled_miou"] is None
    assert not set(runs.RunResult.SEARCH_ONLY) & set(written)  # a single run has no search keys
    search = runs.RunResult("s", "search", best_trial="t1", params={"stage2.lambda_s": 2.0}, trials=4).to_dict()
    assert (search["best_trial"], search["trials"], "trial" in search) == ("t1", 4, False)


def test_checkpoints_are_ordered_by_epoch_past_999(tmp_path):
    """`epoch1000` sorts before `epoch999` as text: the rotation would delete the newest checkpoint
    and a resume would start from epoch 999."""
    from cdsp_core.runner import latest_run_checkpoint, list_checkpoints

    for epoch in (998, 999, 1000, 1001):
        runs.write_bytes(runs.join(str(tmp_path), runs.CHECKPOINTS, runs.checkpoint_name("stage2", epoch)), b"x")
    runs.write_bytes(runs.join(str(tmp_path), runs.CHECKPOINTS, "stage2-round2-epoch005.pt"), b"x")  # another stage
    names = list_checkpoints(str(tmp_path), "stage2")
    assert names == ["stage2-epoch998.pt", "stage2-epoch999.pt", "stage2-epoch1000.pt", "stage2-epoch1001.pt"]
    assert latest_run_checkpoint(str(tmp_path), "stage2").name == "stage2-epoch1001.pt"
    assert runs.checkpoint_epoch("notes.pt") == -1


def test_a_fetched_checkpoint_is_removed_once_read_and_nothing_else_is(tmp_path):
    import tempfile

    import torch

    from cdsp_core.runner import DOWNLOAD_PREFIX, fetched, load_checkpoint

    copy = fetched(Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=tmp_path)) / "stage2-epoch001.pt")
    torch.save({"epoch": 1}, copy)
    assert load_checkpoint(copy) == {"epoch": 1} and not copy.parent.exists()
    mine = tmp_path / f"{DOWNLOAD_PREFIX}my-models"  # a user's folder that happens to share the prefix
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    torch.save({"epoch": 2}, mine / "stage2-epoch002.pt")
    assert load_checkpoint(mine / "stage2-epoch002.pt") == {"epoch": 2}
    (mine / "broken.pt").write_text("garbage")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(mine / "broken.pt")
    assert sorted(p.name for p in mine.iterdir()) == ["broken.pt", "notes.txt", "stage2-epoch002.pt"]
