"""A `cdsp run --ray` that is terminated or killed leaves no local Ray cluster behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.workers.helpers import REPO, tiny_spec

CDSP = Path(sys.executable).with_name("cdsp")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def cmdlines() -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def cluster_processes(temp_dir: str) -> list[int]:
    """Every process of the local cluster whose session folder is `temp_dir` (the head, GCS, raylet...)."""
    return [pid for pid, cmd in cmdlines().items() if temp_dir in cmd]


def start_run(tmp_path: Path, tiny_synth: Path) -> tuple[subprocess.Popen[str], str]:
    """`cdsp run --ray` on a spec long enough to be stopped in the middle; returns it and its cluster's folder."""
    spec = tiny_spec(tiny_synth, stage2__epochs=50, resources__num_workers=1)
    config = tmp_path / "spec.yaml"
    config.write_text(spec.to_yaml())
    env = {**os.environ, "COLUMNS": "200"}
    args = [str(CDSP), "run", str(config), "--out", str(tmp_path / "run"), "--ray", "--no-progress"]
    # SIGINT as a terminal sends it: a suite started in the background of a non-interactive shell has it
    # ignored, which its children inherit (Python then installs no KeyboardInterrupt handler).
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    for line in proc.stdout:  # the driver prints the dashboard once the cluster is up
        if "Ray dashboard:" in line or time.monotonic() > deadline:
            break
    head = cmdlines()[child_of(proc.pid, "start --head")]  # `cdsp` is the driver: it started the head
    m = re.search(r"--temp-dir=(\S+)", head)
    assert m, head
    return proc, m.group(1)


def wait_gone(temp_dir: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := cluster_processes(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def child_of(pid: int, marker: str) -> int:
    """The child process of `pid` whose command line holds `marker`."""
    for child, cmd in cmdlines().items():
        if marker in cmd:
            try:
                if parent(child) == pid:
                    return child
            except OSError:
                continue
    raise AssertionError(f"no child of {pid} runs {marker!r}")


@pytest.mark.timeout(300)
def test_sigterm_to_cdsp_run_stops_its_cluster(tmp_path: Path, tiny_synth: Path) -> None:
    proc, temp_dir = start_run(tmp_path, tiny_synth)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        assert not wait_gone(temp_dir, 60), "the local Ray cluster outlived `cdsp run --ray`"
        assert proc.returncode != 0
    finally:
        proc.kill()
        for pid in cluster_processes(temp_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_ctrl_c_in_training_interrupts_cdsp_run_and_stops_its_cluster(tmp_path: Path, tiny_synth: Path) -> None:
    """SIGINT while a stage trains: `error: interrupted`, exit 130, no Ray process left (Ray's handler
    used to abort the stage quietly, and the run ended as a broken one)."""
    proc, temp_dir = start_run(tmp_path, tiny_synth)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # until stage 2 trains (50 epochs): the SIGINT lands inside a stage
            seen.append(line)
            if re.search(r"stage2 epoch [2-9]/\d+", line):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stdout.read()
        proc.wait(timeout=90)
        assert proc.returncode == 130, "".join(seen)[-2000:] + rest[-3000:]
        assert rest.rstrip().endswith("error: interrupted"), rest[-3000:]
        assert not wait_gone(temp_dir, 60), "the local Ray cluster outlived `cdsp run --ray`"
    finally:
        proc.kill()
        for pid in cluster_processes(temp_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_a_killed_driver_takes_its_cluster_with_it(tmp_path: Path, tiny_synth: Path) -> None:
    proc, temp_dir = start_run(tmp_path, tiny_synth)
    try:
        proc.kill()  # SIGKILL to the driver: no cleanup runs in it
        proc.wait(timeout=30)
        assert not wait_gone(temp_dir, 90), "the local Ray cluster outlived its SIGKILLed driver"
    finally:
        proc.kill()
        for pid in cluster_processes(temp_dir):
            os.kill(pid, signal.SIGKILL)
