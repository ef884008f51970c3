"""Run folders on S3-compatible storage, against a real S3 server (moto, loopback).

The same behaviour is asked of a local folder and of `s3://bucket/prefix`, so a run written by a
Ray worker to MinIO reads back in the control plane exactly as a local run does. The S3-only tests
cover what a local folder cannot show: writes by another process (a worker) seen on the next read,
object keys under the prefix, and pyarrow's S3 filesystem (what Ray Train's `storage_path` and
`ray.train.Checkpoint` use) configured from the same environment variables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cdsp_core import runs
from tests.s3 import S3Server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run folder that does not exist yet: a local path, or a prefix in a fresh S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "runs" / "exp-1")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/exp-1"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_folder(root: Path) -> dict[str, bytes]:
    """A small run folder with nested subfolders and a checkpoint larger than one read chunk."""
    files = {
        runs.SPEC: b"kind: stage2\nseed: 0\n",
        runs.RESULT: json.dumps({"miou": 71.5, "checkpoint": "checkpoints/stage2-epoch002.pt"}).encode(),
        f"{runs.CHECKPOINTS}/stage2-epoch001.pt": os.urandom(2_500_000),
        f"{runs.CHECKPOINTS}/stage2-epoch002.pt": os.urandom(1_000),
        f"{runs.FIGURES}/samples/grid.png": b"\x89PNG fake",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_write_read_exists_size(location: str) -> None:
    spec = runs.join(location, runs.SPEC)
    assert not runs.exists(spec)
    assert runs.read_json(runs.join(location, runs.RESULT)) is None
    runs.write_text(spec, "kind: pipeline\n")
    assert runs.exists(spec)
    assert runs.read_text(spec) == "kind: pipeline\n"
    assert runs.size(spec) == len("kind: pipeline\n")
    runs.write_bytes(spec, b"kind: stage1\nname: longer\n")  # overwrite in place
    assert runs.read_bytes(spec) == b"kind: stage1\nname: longer\n"
    assert runs.size(spec) == 26


def test_listdir(location: str) -> None:
    assert runs.listdir(location) == []  # missing folder
    runs.write_text(runs.join(location, runs.SPEC), "x")
    runs.write_bytes(runs.join(location, runs.CHECKPOINTS, "stage2-epoch001.pt"), b"w")
    runs.write_bytes(runs.join(location, runs.CHECKPOINTS, "stage1-epoch003.pt"), b"w")
    assert runs.listdir(location) == [runs.CHECKPOINTS, runs.SPEC]
    assert runs.listdir(runs.join(location, runs.CHECKPOINTS)) == ["stage1-epoch003.pt", "stage2-epoch001.pt"]
    assert runs.listdir(runs.join(location, runs.SPEC)) == []  # a file has no entries
    runs.remove(runs.join(location, runs.CHECKPOINTS, "stage1-epoch003.pt"))
    runs.remove(runs.join(location, runs.CHECKPOINTS, "stage1-epoch003.pt"))  # missing: no error
    assert runs.listdir(runs.join(location, runs.CHECKPOINTS)) == ["stage2-epoch001.pt"]


def test_iter_chunks_streams_whole_file(location: str) -> None:
    data = os.urandom(2_500_000)
    ckpt = runs.join(location, runs.CHECKPOINTS, "stage2-epoch050.pt")
    runs.write_bytes(ckpt, data)
    chunks = list(runs.iter_chunks(ckpt, chunk=1 << 20))
    assert [len(c) for c in chunks] == [1 << 20, 1 << 20, 2_500_000 - 2 * (1 << 20)]
    assert b"".join(chunks) == data


def test_upload_then_download_folder(location: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _run_folder(src)
    runs.upload(src, location)
    assert runs.listdir(location) == sorted([runs.CHECKPOINTS, runs.FIGURES, runs.RESULT, runs.SPEC])
    assert runs.read_json(runs.join(location, runs.RESULT))["miou"] == 71.5

    fresh = tmp_path / "fetched" / "run"  # parent does not exist yet
    assert runs.download(location, fresh) == fresh
    assert _tree(fresh) == files

    one = runs.download(runs.join(location, runs.CHECKPOINTS, "stage2-epoch001.pt"), tmp_path / "one" / "c.pt")
    assert one.read_bytes() == files["checkpoints/stage2-epoch001.pt"]


def test_read_jsonl_of_a_growing_file(location: str) -> None:
    metrics = runs.join(location, runs.METRICS)
    assert runs.read_jsonl(metrics) == []
    lines = ""
    for epoch in range(3):
        # Object stores cannot append: the writer rewrites the whole object each epoch.
        lines += json.dumps({"stage": "stage2", "epoch": epoch, "loss": 1.0 / (epoch + 1)}) + "\n"
        runs.write_text(metrics, lines)
        assert [row["epoch"] for row in runs.read_jsonl(metrics)] == list(range(epoch + 1))
    runs.write_text(metrics, lines + '{"stage": "stage2", "epo')  # a torn last line is skipped
    assert len(runs.read_jsonl(metrics)) == 3


# ---- S3 only ----------------------------------------------------------------------------------


def test_objects_are_keys_under_the_prefix(s3_env: S3Server, s3_bucket: str) -> None:
    runs.write_text(f"s3://{s3_bucket}/runs/exp-7/{runs.SPEC}", "kind: stage2\n")
    runs.write_bytes(f"s3://{s3_bucket}/runs/exp-7/{runs.CHECKPOINTS}/stage2-epoch001.pt", b"w")
    listed = s3_env.client().list_objects_v2(Bucket=s3_bucket)
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "runs/exp-7/checkpoints/stage2-epoch001.pt",
        "runs/exp-7/spec.yaml",
    ]


def test_writes_by_another_process_are_seen(s3_env: S3Server, s3_bucket: str) -> None:
    """The control plane polls a run folder that Ray workers write: nothing may be served stale."""
    run = f"s3://{s3_bucket}/runs/exp-2"
    worker = s3_env.client()  # an independent S3 client stands for the worker process
    worker.put_object(Bucket=s3_bucket, Key="runs/exp-2/checkpoints/stage2-epoch001.pt", Body=b"1")
    worker.put_object(Bucket=s3_bucket, Key="runs/exp-2/metrics.jsonl", Body=b'{"epoch": 0}\n')
    assert runs.listdir(runs.join(run, runs.CHECKPOINTS)) == ["stage2-epoch001.pt"]
    assert runs.size(runs.join(run, runs.METRICS)) == 13

    worker.put_object(Bucket=s3_bucket, Key="runs/exp-2/checkpoints/stage2-epoch002.pt", Body=b"2")
    worker.put_object(Bucket=s3_bucket, Key="runs/exp-2/metrics.jsonl", Body=b'{"epoch": 0}\n{"epoch": 1}\n')
    worker.put_object(Bucket=s3_bucket, Key="runs/exp-2/result.json", Body=b'{"miou": 70.0}')
    assert runs.listdir(runs.join(run, runs.CHECKPOINTS)) == ["stage2-epoch001.pt", "stage2-epoch002.pt"]
    assert runs.size(runs.join(run, runs.METRICS)) == 26
    assert [r["epoch"] for r in runs.read_jsonl(runs.join(run, runs.METRICS))] == [0, 1]
    assert runs.exists(runs.join(run, runs.RESULT))
    assert runs.read_json(runs.join(run, runs.RESULT)) == {"miou": 70.0}


def test_cdsp_s3_endpoint_overrides_aws_endpoint_url(
    s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("CDSP_S3_ENDPOINT", s3_env.endpoint_url)
    runs.write_text(f"s3://{s3_bucket}/runs/exp-3/{runs.SPEC}", "seed: 1\n")
    body = s3_env.client().get_object(Bucket=s3_bucket, Key="runs/exp-3/spec.yaml")["Body"].read()
    assert body == b"seed: 1\n"


def test_pyarrow_s3_filesystem_round_trip(s3_env: S3Server, s3_bucket: str) -> None:
    """pyarrow, configured explicitly, reads what runs.py wrote and the other way round."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=s3_env.endpoint_url,
        access_key=s3_env.access_key,
        secret_key=s3_env.secret_key,
        region=s3_env.region,
    )
    runs.write_bytes(f"s3://{s3_bucket}/runs/exp-4/{runs.RESULT}", b'{"miou": 1.0}')
    with fs.open_input_stream(f"{s3_bucket}/runs/exp-4/{runs.RESULT}") as f:
        assert f.read() == b'{"miou": 1.0}'
    with fs.open_output_stream(f"{s3_bucket}/runs/exp-4/{runs.CHECKPOINTS}/stage2-epoch001.pt") as f:
        f.write(b"weights")
    assert runs.listdir(f"s3://{s3_bucket}/runs/exp-4/{runs.CHECKPOINTS}") == ["stage2-epoch001.pt"]
    info = fs.get_file_info(f"{s3_bucket}/runs/exp-4/{runs.CHECKPOINTS}/stage2-epoch001.pt")
    assert info.size == len(b"weights")


def test_ray_train_storage_uses_the_same_environment(s3_env: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Ray Train resolves `storage_path="s3://..."` with pyarrow from the environment alone.

    A folder copied up the way Ray persists checkpoints (`pyarrow.fs.copy_files`) is a run folder
    for runs.py, and a run folder uploaded by runs.py downloads through `ray.train.Checkpoint`.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    src = tmp_path / "ckpt"
    files = _run_folder(src)
    pafs.copy_files(str(src), f"s3://{s3_bucket}/ray/exp-5/checkpoint_000000")
    persisted = f"s3://{s3_bucket}/ray/exp-5/checkpoint_000000"
    assert runs.listdir(persisted) == sorted([runs.CHECKPOINTS, runs.FIGURES, runs.RESULT, runs.SPEC])
    assert runs.listdir(runs.join(persisted, runs.CHECKPOINTS)) == ["stage2-epoch001.pt", "stage2-epoch002.pt"]
    assert _tree(runs.download(persisted, tmp_path / "via-runs")) == files

    runs.upload(src, f"s3://{s3_bucket}/runs/exp-5")
    fetched = Path(Checkpoint(f"s3://{s3_bucket}/runs/exp-5").to_directory(str(tmp_path / "via-ray")))
    assert _tree(fetched) == files
