"""deploy/docker/ray-worker-start.sh: how `--scale ray-worker=N` replicas share a machine's GPUs.

Docker gives every replica the same GPUs, so the script must hand each replica its own group. It
runs here with a stand-in `ray` that records what it was given and then holds on like `ray start
--block`; every replica's claims directory is one shared folder, as the compose volume is.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.helpers import DOCKER_DIR

pytestmark = pytest.mark.timeout(60)

SCRIPT = DOCKER_DIR / "ray-worker-start.sh"
FAKE_RAY = """#!/usr/bin/env bash
echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} ARGS=$*" > "$FAKE_RAY_OUT.tmp"
mv "$FAKE_RAY_OUT.tmp" "$FAKE_RAY_OUT"
exec sleep 60
"""


class Replicas:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "bin").mkdir()
        (tmp / "bin" / "ray").write_text(FAKE_RAY)
        (tmp / "bin" / "ray").chmod(0o755)
        self.procs: list[subprocess.Popen[str]] = []

    def env(self, out: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CDSP_", "RAY_", "CUDA_"))}
        env.update(
            PATH=f"{self.tmp / 'bin'}:{env['PATH']}",
            RAY_HEAD_ADDRESS="ray-head:6379",
            CDSP_GPU_CLAIMS=str(self.tmp / "claims"),
            FAKE_RAY_OUT=str(out),
        )
        env.update(extra)
        return env

    def start(self, **extra: str) -> tuple[subprocess.Popen[str], Path]:
        """Start a replica; returns once it has handed over to `ray` (or exited)."""
        out = self.tmp / f"replica-{len(self.procs)}.txt"
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)], env=self.env(out, **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while not out.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the replica neither started ray nor exited"
            time.sleep(0.02)
        return proc, out

    def started(self, **extra: str) -> dict[str, str]:
        proc, out = self.start(**extra)
        assert out.exists(), f"replica exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
        visible, args = out.read_text().strip().split(" ARGS=")
        return {"gpus": visible.removeprefix("CUDA_VISIBLE_DEVICES="), "args": args}

    def stop(self, proc: subprocess.Popen[str]) -> None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    group = Replicas(tmp_path)
    yield group
    for proc in group.procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_default_owns_every_gpu(replicas: Replicas) -> None:
    node = replicas.started()
    assert node["gpus"] == "unset"  # Ray sees all GPUs of the container
    assert node["args"] == "start --address=ray-head:6379 --block"


def test_replicas_take_distinct_gpus_until_none_is_left(replicas: Replicas) -> None:
    nodes = [replicas.started(CDSP_GPUS_PER_WORKER="1", CDSP_GPU_COUNT="3") for _ in range(3)]
    assert [n["gpus"] for n in nodes] == ["0", "1", "2"]
    assert all(n["args"] == "start --address=ray-head:6379 --block --num-gpus=1" for n in nodes)
    proc, out = replicas.start(CDSP_GPUS_PER_WORKER="1", CDSP_GPU_COUNT="3")
    assert proc.wait(timeout=10) == 3 and not out.exists()
    assert "no free group of 1 GPU(s) among 3" in proc.stderr.read()  # type: ignore[union-attr]


def test_a_stopped_replica_frees_its_gpus(replicas: Replicas) -> None:
    replicas.started(CDSP_GPUS_PER_WORKER="1", CDSP_GPU_COUNT="2")
    replicas.started(CDSP_GPUS_PER_WORKER="1", CDSP_GPU_COUNT="2")
    replicas.stop(replicas.procs[0])  # the container of GPU 0 stops: the kernel drops its lock
    assert replicas.started(CDSP_GPUS_PER_WORKER="1", CDSP_GPU_COUNT="2")["gpus"] == "0"


def test_groups_of_several_gpus(replicas: Replicas) -> None:
    first = replicas.started(CDSP_GPUS_PER_WORKER="2", CDSP_GPU_COUNT="5")
    second = replicas.started(CDSP_GPUS_PER_WORKER="2", CDSP_GPU_COUNT="5")
    assert (first["gpus"], second["gpus"]) == ("0,1", "2,3")
    assert first["args"].endswith("--num-gpus=2")
    proc, _ = replicas.start(CDSP_GPUS_PER_WORKER="2", CDSP_GPU_COUNT="5")  # GPU 4 alone is not a group
    assert proc.wait(timeout=10) == 3


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_gpus_per_worker_is_refused(replicas: Replicas, bad: str) -> None:
    proc, out = replicas.start(CDSP_GPUS_PER_WORKER=bad, CDSP_GPU_COUNT="2")
    assert proc.wait(timeout=10) == 2 and not out.exists()


def test_head_address_is_required(replicas: Replicas) -> None:
    env = replicas.env(replicas.tmp / "never.txt")
    del env["RAY_HEAD_ADDRESS"]
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=10)
    assert out.returncode != 0 and "RAY_HEAD_ADDRESS" in out.stderr
