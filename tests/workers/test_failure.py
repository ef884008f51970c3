"""Fault tolerance on the real cluster: a training worker SIGKILLed mid-epoch is replaced and training
resumes from Ray's latest checkpoint at the right epoch; then the whole run (the job's driver) is
killed, started again on the same folder, and resumes instead of starting over."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from tests.workers.helpers import REPO, tiny_spec

EPOCHS, STEPS = 6, 4  # 16 images, global batch 4 over 2 workers: 4 steps an epoch


@pytest.fixture(scope="module")
def synth16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images: epochs long enough (4 steps) to land a kill inside one."""
    from cdsp_core.data.synthetic import generate

    root = tmp_path_factory.mktemp("synth16")
    generate(root, num_train=16, num_val=4, size=64, num_classes=3, seed=1)
    return root


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes of this test session's cluster: descendants of this
    process (it started the cluster's raylet, whose children are the workers) titled RayTrainWorker."""
    pids, stack = [], [os.getpid()]
    while stack:
        for child in _children(stack.pop()):
            stack.append(child)
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::RayTrainWorker"):
                pids.append(child)
    return pids


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until `path` exists (a glob pattern when it holds `*`)."""
    deadline = time.monotonic() + timeout
    while not glob.glob(str(path)):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.1)


def wait_logged(log: Path, text: str, proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until the driver's log holds `text`. Worker lines reach the driver through Ray's log
    monitor, a second or more after they are printed (more on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {text!r} reached its log"
        assert time.monotonic() < deadline, f"{text!r} did not reach the driver's log within {timeout} s"
        time.sleep(0.1)


def wait_registered(out: Path, epoch: int, proc: subprocess.Popen[str], timeout: float) -> None:
    """Wait until Ray's checkpoint manager has registered the checkpoint of `epoch` (its snapshot says
    so). Until then a restarted group gets no checkpoint from Ray and resumes from the run folder,
    which is correct too but is not the path this test means to check."""
    snapshot = out / "ray" / "stage2" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = None
        if latest == epoch:
            return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode})"
        assert time.monotonic() < deadline, f"Ray did not register epoch {epoch} within {timeout} s"
        time.sleep(0.1)


def start(spec_path: Path, out: Path, address: str, log: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec_path), "--out", str(out), "--address", address]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_worker_killed_mid_epoch_then_whole_run_killed(ray_cluster: Any, synth16: Path, tmp_path: Path) -> None:
    spec = tiny_spec(
        synth16, kind="stage2", data__pseudo_label_dir="SegmentationClassAug", stage2__epochs=EPOCHS,
        stage2__keep_checkpoints=EPOCHS, resources__max_failures=1,
    )  # fmt: skip
    spec_path, out = tmp_path / "spec.yaml", tmp_path / "run"
    spec_path.write_text(spec.to_yaml())
    ckpt = out / "checkpoints"
    t0 = time.perf_counter()

    # 1. A worker dies inside epoch 2: Ray replaces the group, which resumes from Ray's checkpoint.
    first = start(spec_path, out, ray_cluster.address, tmp_path / "first.log")
    try:
        wait_for(ckpt / "stage2-epoch001.pt", first, timeout=180)
        wait_registered(out, 1, first, timeout=30)
        time.sleep(0.5)  # into epoch 2
        workers = train_worker_pids()
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        # 2. After the recovery (its resume line in the driver's log), kill the driver: the whole run.
        wait_for(ckpt / "stage2-epoch002.pt", first, timeout=180)
        assert max(workers) not in train_worker_pids()
        wait_logged(tmp_path / "first.log", "stage2: resuming from", first, timeout=60)
        first.kill()
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    log1 = (tmp_path / "first.log").read_text()
    assert "resuming from" in log1, log1[-3000:]
    resumed = [ln for ln in log1.splitlines() if "stage2: resuming from" in ln]
    assert len(resumed) == 1 and resumed[0].endswith("at epoch 2"), resumed
    assert "/ray/stage2/checkpoint_" in resumed[0]  # Ray's reported checkpoint, from get_checkpoint()
    assert not (out / "result.json").exists()
    saved = max(runs.checkpoint_epoch(p.name) for p in ckpt.glob("stage2-epoch*.pt"))
    assert saved < EPOCHS, "the run finished before the driver was killed"

    # 3. The same command again: the run resumes after its last checkpoint instead of starting over.
    second = subprocess.run(
        [sys.executable, "-m", "workers.run", "--spec", str(spec_path), "--out", str(out),
         "--address", ray_cluster.address],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = [ln for ln in (second.stdout + second.stderr).splitlines() if "stage2: resuming from" in ln]
    assert len(resumed) == 1, resumed
    assert resumed[0].endswith(f"at epoch {saved + 1}"), resumed
    print(f"worker kill + driver kill + resume: {time.perf_counter() - t0:.1f} s")

    rows = [r for r in runs.read_jsonl(str(out / runs.METRICS)) if r["stage"] == "stage2"]
    epochs = [r["epoch"] for r in rows]
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1))
    assert epochs == sorted(epochs)  # resumed forward, never back to epoch 1
    last = {r["epoch"]: r for r in rows}
    assert [last[e]["step"] for e in range(1, EPOCHS + 1)] == [STEPS * e for e in range(1, EPOCHS + 1)]
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == {"stage2": EPOCHS} and result["checkpoint"] == f"checkpoints/stage2-epoch{EPOCHS:03d}.pt"
