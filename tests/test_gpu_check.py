"""scripts/gpu-check.sh --dry-run: the prepared GPU check runs end to end on CPU (so that it cannot rot
between the rare sessions with a GPU), says that the CUDA parts were skipped and why, and writes
its results to $OUT, never over the committed figures."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gpu_check_dry_run_completes_on_cpu(tmp_path: Path) -> None:
    committed = {p.name: p.stat().st_mtime for p in (REPO / "benchmarks/results").glob("*")}
    env = {**os.environ, "OUT": str(tmp_path)}
    env.pop("CDSP_BENCH_RESULTS", None)
    proc = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=580
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "results" / "gpu-check-none-dry-run.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    for part in ("cuda-tests", "train-step", "lorm", "memory", "loader", "pipeline"):
        assert " | ok | " in rows[part], rows.get(part)
    assert "no CUDA device" in proc.stdout  # the skip reason is shown
    assert "skipped" in rows["cuda-tests"]
    assert " of a 480 s budget" in summary
    for name in ("train_step-cpu.md", "lorm-cpu.md", "activation_memory-cpu.md", "loader-cpu.md",
                 "gpu-check-pipeline-result.json"):  # fmt: skip
        assert (tmp_path / "results" / name).is_file(), name
    assert "Where the time of 'ours' goes" in (tmp_path / "results" / "train_step-cpu.md").read_text()  # the profile
    # What the device tool brings back (at most 8 files): the summary and one archive of results and logs.
    with tarfile.open(tmp_path / "gpu-check-none-dry-run.tar.gz") as tf:
        names = set(tf.getnames())
    assert {"./setup.log", "./train-step.log", "./pipeline.log", "./results/train_step-cpu.json"} <= names, names
    assert (tmp_path / "gpu-check-none-dry-run.md").is_file()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| loader | ok")  # the summary table comes last
    assert {p.name: p.stat().st_mtime for p in (REPO / "benchmarks/results").glob("*")} == committed


def test_a_part_without_the_time_it_needs_is_skipped_and_says_how_to_rerun_it(tmp_path: Path) -> None:
    """With too little of GPU_CHECK_BUDGET left, a part is reported as skipped (not started only to
    be cut off), naming the --only that reruns it; a skipped part is no failure."""
    # 30 s less the 20 kept for the summary: less than any part's minimum (setup 30, the loader 20).
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET": "30"}
    proc = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " | skipped | " in line]
    parts = {row.split(" | ")[0].strip("| ") for row in rows}
    assert parts == {"setup", "cuda-tests", "train-step", "lorm", "memory", "pipeline", "loader"}, proc.stdout[-3000:]
    assert all("out of time" in row for row in rows), rows
    assert any("rerun with --only lorm" in row for row in rows), rows


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--only", "lorm,nosuch"], "no part named 'nosuch'"), (["--fast"], "unknown argument: --fast")],
)
def test_a_bad_argument_is_refused_by_name(args: list[str], message: str) -> None:
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
