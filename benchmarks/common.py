"""Shared helpers of the benchmark scripts: device description, result files, tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Where results are written: `CDSP_BENCH_RESULTS` sends a run elsewhere (the GPU check's dry run, so
# that it never overwrites the committed figures).
RESULTS = Path(os.environ.get("CDSP_BENCH_RESULTS") or ROOT / "benchmarks" / "results")


def device_name(device: torch.device) -> str:
    """Short device tag for file names: `cpu` or the GPU's name (`h100`...)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for tag in ("h200", "h100", "a100", "l40s", "a10g", "4090", "v100", "t4"):
            if tag in name:
                return tag
        return name.replace(" ", "-")
    return "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "device": str(device),
        # 1/5/15-minute load averages when the results are written: other work on the machine.
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    name: str, device: torch.device, payload: dict[str, Any], markdown: str, tag: str | None = None
) -> tuple[Path, Path]:
    """benchmarks/results/<name>-<tag>.{json,md}, each with the device, versions and command; the tag
    is the device's (`device_name`) unless given."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = tag or device_name(device)
    stem = f"{name}-{tag}"
    env = environment(device)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    body = {"benchmark": name, "command": command, "environment": env, **payload}
    json_path = RESULTS / f"{stem}.json"
    json_path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    md_path = RESULTS / f"{stem}.md"
    header = [f"# {name} ({tag})", "", f"Command: `{command}`", ""]
    header += [f"- {k}: {v}" for k, v in env.items()] + [""]
    md_path.write_text("\n".join(header) + markdown.rstrip() + "\n")
    return json_path, md_path
