"""Helpers of the Ray tests: tiny specs and the job entrypoint as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cdsp_core.spec import ExperimentSpec, load_spec

REPO = Path(__file__).resolve().parents[2]


def tiny_spec(root: Path, **overrides: Any) -> ExperimentSpec:
    """A pipeline spec that trains in seconds on `tiny_synth`; `overrides` use dotted keys with `__` for `.`."""
    base = {
        "name": "tiny",
        "kind": "pipeline",
        "data": {"root": str(root), "num_classes": 3, "crop_size": 64, "loader_workers": 0},
        "stage1": {"backbone": "resnet18", "output_stride": 8, "epochs": 1, "batch_size": 4, "lr": 0.05,
                   "cam_scales": [1.0]},
        "stage2": {"segmentor": "deeplabv3plus", "backbone": "resnet18", "output_stride": 8, "epochs": 2,
                   "batch_size": 4, "lr": 0.05, "warmup_epochs": 0.5},
        "resources": {"num_workers": 2, "cpus_per_worker": 1.0},
    }  # fmt: skip
    return load_spec(base).with_overrides({k.replace("__", "."): v for k, v in overrides.items()})


def run_entrypoint(
    args: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m workers.run ARGS` (or another module with `-m` in ARGS) in the repository, bounded in time."""
    cmd = [sys.executable, *args] if args and args[0] == "-m" else [sys.executable, "-m", "workers.run", *args]
    return subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""
