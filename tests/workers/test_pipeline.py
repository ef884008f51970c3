"""The whole pipeline through the entrypoint on the session cluster, as `cdsp run --address ADDRESS` runs it:
stage 1 (2 DDP workers) and its pseudo-labels split across them, stage 2, evaluation, run folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from cdsp_core.runs import QUALITY_KEYS
from tests.workers.helpers import last_line, run_entrypoint, tiny_spec


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_full_pipeline_then_rerun_returns_at_once(ray_cluster: Any, tiny_synth: Path, tmp_path: Path) -> None:
    config, out = tmp_path / "tiny.yaml", tmp_path / "run"
    # Two stage-1 rounds: the second trains on the first's pseudo-labels, which both ranks labelled.
    config.write_text(tiny_spec(tiny_synth, stage1__rounds=2, stage1__round_epochs=1).to_yaml())
    start = time.perf_counter()
    cli = ["-m", "service.cli", "run", str(config), "--out", str(out), "--set", "stage2.epochs=1"]
    proc = run_entrypoint([*cli, "--address", ray_cluster.address], timeout=360)
    wall = time.perf_counter() - start
    print(f"full pipeline on Ray: {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert last_line(proc.stdout).startswith("done: pseudo-label mIoU")

    names = {p.name for p in out.iterdir()}
    assert {"spec.yaml", "metrics.jsonl", "pseudo_labels", "checkpoints", "result.json", "figures"} <= names
    train_ids = (tiny_synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    labels = sorted(p.stem for p in (out / "pseudo_labels").glob("*.png"))
    assert labels == sorted(train_ids)  # every rank's share is there
    assert (out / "pseudo_labels" / ".complete").is_file()
    rows = runs.read_jsonl(str(out / runs.METRICS))
    assert [r["stage"] for r in rows] == ["stage1", "pseudo_labels", "stage1-round2", "pseudo_labels", "stage2"]
    assert [r["round"] for r in rows if r["stage"] == "pseudo_labels"] == [1, 2]
    assert all(r["step"] == 2 for r in rows if "step" in r)  # 8 images over 2 ranks of batch 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "stage1-epoch001.pt", "stage1-round2-epoch001.pt", "stage2-epoch001.pt"
    ]  # fmt: skip
    first_round = sorted(p.stem for p in (out / "pseudo_labels-round1").glob("*.png"))
    assert first_round == sorted(train_ids)  # round 2 trained on every rank's share of round 1
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"name", "kind", "miou", *QUALITY_KEYS, "per_class_iou", "checkpoint", "epochs",
                           "duration_s"}  # fmt: skip
    assert result["epochs"] == {"stage1": 2, "stage2": 1}
    assert all(result[k] == rows[3][k] and 0 <= result[k] <= 100 for k in QUALITY_KEYS)  # the last round's
    assert rows[3]["seconds_per_image"] > 0 and "cls_map" in rows[0]
    assert result["miou"] == rows[4]["miou"]
    assert {"samples.png", "miou.png", "loss.png"} <= {p.name for p in (out / "figures").iterdir()}

    # The same command on the finished folder: answered from result.json, nothing trained or rewritten.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    start = time.perf_counter()
    again = run_entrypoint([*cli, "--ray", "--address", ray_cluster.address], timeout=120)
    print(f"re-run of the finished pipeline: {time.perf_counter() - start:.1f} s")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already holds the finished run" in again.stdout
    assert json.loads((out / "result.json").read_text()) == result
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dataset_problems_fail_before_any_training(tiny_synth: Path, tmp_path: Path) -> None:
    """No cluster needed: the dataset is checked before Ray is started; one `error: ` line, exit 2."""
    spec = tiny_spec(tiny_synth, data__image_dir="NoSuchFolder")
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    proc = run_entrypoint(["--spec", str(path), "--out", str(tmp_path / "run")], timeout=100)
    assert proc.returncode == 2
    line = last_line(proc.stdout)
    assert line.startswith("error: dataset problems: data.image_dir: folder ")
    assert line.endswith("NoSuchFolder is missing")
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_spec_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("kind: pipeline\nstage2: {epochs: 0}\n")
    proc = run_entrypoint(["--spec", str(path), "--out", str(tmp_path / "run")], timeout=50)
    assert proc.returncode == 2
    assert last_line(proc.stdout).startswith("error: stage2.epochs: ")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ray_job_failure_ends_with_one_error_line(ray_cluster: Any, tiny_synth: Path, tmp_path: Path) -> None:
    """As the service runs it: a Ray job (Jobs API, bearer token) whose worker raises (here: missing
    weights) fails with the driver's exit status 1 and the root cause as the log's last line."""
    import os
    import sys

    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = tiny_spec(
        tiny_synth, kind="stage2", data__pseudo_label_dir="SegmentationClassAug", stage2__epochs=1,
        stage2__pretrained="/nonexistent/weights.pt",
    )  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    token = os.environ["RAY_AUTH_TOKEN"]
    client = JobSubmissionClient(ray_cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m workers.run --spec {path} --out {tmp_path / 'run'}",
        submission_id=f"exp-{tmp_path.name}",
    )
    deadline = time.monotonic() + 200
    while not client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(1)
    info = client.get_job_info(job)
    logs = client.get_job_logs(job)
    assert info.status == JobStatus.FAILED and info.driver_exit_code == 1, logs[-3000:]
    assert last_line(logs) == (
        "error: training failed: FileNotFoundError: pretrained weights /nonexistent/weights.pt: no such file"
    )


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resources_the_cluster_cannot_offer_fail_after_a_bounded_wait(
    ray_cluster: Any, tiny_synth: Path, tmp_path: Path
) -> None:
    """GPUs asked of a CPU-only cluster, more CPUs per worker than any node has, or two workers on two
    nodes of a one-node cluster: one `error:` line naming the resources after CDSP_RESOURCE_WAIT, instead
    of a run that waits for ever (or a worker group that never starts)."""
    for overrides, missing in (
        ({"resources__use_gpu": True}, "1 GPU"),
        ({"resources__cpus_per_worker": 64}, "64 CPU"),
        ({"resources__placement": "strict_spread", "resources__cpus_per_worker": 1}, "strict_spread"),
    ):
        path = tmp_path / "spec.yaml"
        path.write_text(tiny_spec(tiny_synth, **overrides).to_yaml())
        start = time.perf_counter()
        proc = run_entrypoint(
            ["--spec", str(path), "--out", str(tmp_path / "run"), "--address", ray_cluster.address],
            timeout=100, env={"CDSP_RESOURCE_WAIT": "2"},
        )  # fmt: skip
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        line = last_line(proc.stdout)
        assert line.startswith("error: resources: 2 worker(s) of ") and missing in line, line
        assert "waited 2 s" in line and time.perf_counter() - start < 60
