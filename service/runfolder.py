"""Reading a run folder (cdsp_core.runs contract) into what the database keeps about an experiment.

Works on local paths and storage URIs alike through `cdsp_core.runs`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cdsp_core import runs
from cdsp_core.spec import ExperimentSpec, grid_size

# Names the download routes accept: one plain file name, never a path.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def total_epochs(spec: ExperimentSpec) -> int:
    """Epochs of every stage the spec runs; a search counts stage 2 once per trial."""
    total = spec.stage1.total_epochs if spec.runs_stage1 else 0
    if spec.kind in ("pipeline", "stage2"):
        total += spec.stage2.epochs
    elif spec.kind == "search" and spec.search is not None:
        total += trial_epochs(spec)
    return total


def trial_epochs(spec: ExperimentSpec) -> int:
    """Stage-2 epochs summed over a search's trials: the grid's own when the space sets
    `stage2.epochs` on a grid, its largest value for a random domain (an upper bound)."""
    assert spec.search is not None
    trials = grid_size(spec.search)
    domain = spec.search.space.get("stage2.epochs")
    if domain is None:
        return spec.stage2.epochs * trials
    if domain.grid is not None:
        return sum(int(v) for v in domain.grid) * (trials // len(domain.grid))
    if domain.choice is not None:
        return max(int(v) for v in domain.choice) * trials
    if domain.randint is not None:
        return (domain.randint[1] - 1) * trials
    return int((domain.uniform or domain.loguniform or (0, spec.stage2.epochs))[1]) * trials


def epochs_done(spec: ExperimentSpec, rows: list[dict[str, Any]]) -> tuple[int, str | None]:
    """Completed epochs (the highest epoch per stage, per trial for searches) and the current stage."""
    best: dict[tuple[Any, str], int] = {}
    stage = None
    for row in rows:
        st, ep = row.get("stage"), row.get("epoch")
        if isinstance(st, str):
            stage = st
        if not isinstance(st, str) or not st.startswith(("stage1", "stage2")) or not isinstance(ep, int):
            continue
        key = (row.get("trial"), st)
        best[key] = max(best.get(key, 0), ep)
    done = sum(best.values())
    return min(done, total_epochs(spec)), stage


@dataclass
class Snapshot:
    """What the reconciler copies from a run folder into the experiment row."""

    rows: list[dict[str, Any]]
    epochs_done: int
    stage: str | None
    latest: dict[str, Any] | None
    checkpoints: list[dict[str, Any]]
    trials: list[dict[str, Any]] | None
    result: dict[str, Any] | None
    errors: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Files that did not parse this time (being written, or corrupt): their stored copy is kept."""


def read(run_dir: str, spec: ExperimentSpec) -> Snapshot:
    """Read metrics.jsonl, checkpoints/, trials.json and result.json (missing files are fine).

    Every value is made storable as JSON by any database: a NaN or infinite number (a diverged loss)
    becomes null, since PostgreSQL's JSON columns refuse them. Parts of the wrong shape are left out
    and named in `errors`.
    """
    errors: list[str] = []
    unreadable: list[str] = []
    rows = [finite(r) for r in runs.read_jsonl(runs.join(run_dir, runs.METRICS)) if isinstance(r, dict)]
    done, stage = epochs_done(spec, rows)
    trials = _json(run_dir, runs.TRIALS, list, errors, unreadable)
    if trials is not None and not all(isinstance(t, dict) for t in trials):
        errors.append(f"{runs.TRIALS}: every entry must be an object; the file is ignored")
        trials = None
    result = _json(run_dir, runs.RESULT, dict, errors, unreadable)
    if result is not None and not isinstance(result.get("checkpoint", ""), str | None):
        errors.append(f"{runs.RESULT}: 'checkpoint' must be a path; the file is ignored")
        result = None
    latest = latest_metrics(rows)
    return Snapshot(rows, done, stage, latest, checkpoints(run_dir), trials, result, errors, unreadable)


def _json(run_dir: str, name: str, kind: type, errors: list[str], unreadable: list[str]) -> Any:
    try:
        value = runs.read_json(runs.join(run_dir, name))
    except ValueError as exc:  # being written (S3 writes are not atomic), or corrupt: try again next pass
        errors.append(f"{name}: {exc}")
        unreadable.append(name)
        return None
    if value is not None and not isinstance(value, kind):
        errors.append(f"{name}: expected a JSON {'list' if kind is list else 'object'}; the file is ignored")
        return None
    return finite(value)


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def latest_metrics(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last row, plus the last evaluated mIoU when that row has none."""
    if not rows:
        return None
    latest = dict(rows[-1])
    if "miou" not in latest:
        evaluated = [r for r in rows if isinstance(r.get("miou"), int | float)]
        if evaluated:
            latest["last_miou"] = evaluated[-1]["miou"]
    return latest


def checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """`checkpoints/*.pt` with size, stage and epoch (parsed from `stage2-epoch008.pt`)."""
    folder = runs.join(run_dir, runs.CHECKPOINTS)
    found = []
    for name in sorted(runs.listdir(folder), key=runs.checkpoint_order):
        if not name.endswith(".pt") or not SAFE_NAME.match(name):
            continue
        try:
            size = runs.size(runs.join(folder, name))
        except FileNotFoundError:  # deleted by keep_checkpoints rotation between list and stat
            continue
        m = runs.CHECKPOINT_RE.match(name)
        found.append(
            {
                "name": name,
                "size": size,
                "stage": m["stage"] if m else None,
                "epoch": int(m["epoch"]) if m else None,
            }
        )
    return found


def figures(run_dir: str) -> list[str]:
    return [n for n in runs.listdir(runs.join(run_dir, runs.FIGURES)) if n.endswith(".png") and SAFE_NAME.match(n)]


def sha256(location: str) -> str:
    digest = hashlib.sha256()
    for block in runs.iter_chunks(location):
        digest.update(block)
    return digest.hexdigest()


def error_line(logs: str) -> str | None:
    """The worker's one-line reason: the last line starting with `error: ` (contract of workers.run)."""
    for line in reversed(logs.splitlines()):
        stripped = line.strip()
        if stripped.startswith("error: "):
            return stripped[len("error: ") :].strip()[:2000] or None
    return None


def log_location(run_dir: str, submission_id: str) -> str:
    """Where a finished job's logs are kept, one file per attempt: `logs/{submission_id}.log`."""
    return runs.join(run_dir, runs.LOGS, f"{submission_id}.log")
