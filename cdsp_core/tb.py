"""TensorBoard export of a run: `<run>/tb/events.out.tfevents.cdsp`, rewritten whole from metrics.jsonl
whenever the run's figures are (after stage 1 and at the end), so that `tensorboard --logdir` on a
run folder or on the whole artifact store shows every run.

Scalars: each numeric key of each metrics row under `<stage>/<key>` (loss and its terms, mIoU, lr,
the classifier's mAP/F1, the pseudo-label quality), at step = the row's epoch (the pass's round for
`pseudo_labels` rows); a search trial's rows under `<trial>/<stage>/<key>`. The sample figure
(figures/samples.png) as the image `samples`. Written with tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cdsp_core import runs

FOLDER = "tb"
FILE = "events.out.tfevents.cdsp"  # one fixed name: each export replaces the last
SKIP = {"epoch", "epochs", "step", "time", "seconds", "round"}


def scalars(rows: list[dict[str, Any]], sep: str = "/", trials: bool = True) -> list[tuple[str, float, int]]:
    """(tag, value, step) for every numeric value of every row: `<stage><sep><key>` at the row's epoch
    (its round for rows that have none), under `<trial>/` for a trial's rows when `trials` is set.
    Shared by this export and the MLflow mirror (`sep="."`, one child run per trial)."""
    out = []
    for row in rows:
        stage = str(row.get("stage", "run"))
        step = row.get("epoch", row.get("round", 0))
        if not isinstance(step, int):
            continue
        prefix = f"{row['trial']}/{stage}" if trials and row.get("trial") else stage
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out.append((f"{prefix}{sep}{key}", float(value), step))
    return out


def export(run: str, samples_png: Path | None = None) -> str | None:
    """Write the run's event file from its metrics.jsonl (and the sample figure); returns its location."""
    from tensorboardX import SummaryWriter

    rows = runs.read_jsonl(runs.join(run, runs.METRICS))
    values = scalars(rows)
    if not values and samples_png is None:
        return None
    tmp = Path(tempfile.mkdtemp(prefix="cdsp-tb-"))
    try:
        writer = SummaryWriter(logdir=str(tmp))
        for tag, value, step in values:
            writer.add_scalar(tag, value, step)
        if samples_png is not None and samples_png.is_file():
            from PIL import Image

            image = np.asarray(Image.open(samples_png).convert("RGB"))
            writer.add_image("samples", image, 0, dataformats="HWC")
        writer.close()
        (written,) = list(tmp.glob("events.out.tfevents.*"))
        target = runs.join(run, FOLDER, FILE)
        runs.upload(written, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
