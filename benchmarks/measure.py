"""Timing and peak-memory helpers shared by the benchmarks, and one-configuration-per-process runs.

Peak memory:
- CUDA: `torch.cuda.max_memory_allocated` after a reset, minus what was allocated before: the
  tensors the measured work itself allocates at its peak.
- CPU: the process's peak resident set size (VmHWM) reset after setup (`/proc/self/clear_refs`,
  Linux >= 4.0), minus the resident size after setup. Each configuration runs in a fresh process
  so that one configuration's freed memory (kept by the allocator) never hides another's peak.
  Where the reset is not possible, `ru_maxrss` of the fresh process is used instead.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yields a dict that holds `peak_mib` (memory the block allocated at its peak) and `method` after it."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        out["method"] = "torch.cuda.max_memory_allocated minus allocated before"
        return
    base = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    yield out
    if reset:
        out["peak_mib"] = (_status_kib("VmHWM") - base) / 1024
        out["method"] = "peak RSS (VmHWM, reset after setup) minus RSS after setup, fresh process"
    else:
        import resource

        out["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        out["method"] = "ru_maxrss of a fresh process minus RSS after setup"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn` (synchronised on CUDA)."""
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_isolated(module: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """`python -m MODULE ARGS` in a fresh process; its last stdout line is a JSON object.

    A failure (out of memory, a crash, the timeout) comes back as {"error": ...}.
    """
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
        return {"error": ("out of memory: " if oom else "") + " | ".join(tail)[-400:], "returncode": proc.returncode}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def emit(result: dict[str, Any]) -> None:
    """The child's answer to `run_isolated`: one JSON line on stdout."""
    print(json.dumps(result, default=float), flush=True)
