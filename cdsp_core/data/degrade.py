"""Pseudo-labels of controlled quality: ground truth degraded with CAM-like errors.

For the Table 3 analogue of the offline study: stage 2 trained with pseudo-labels whose quality
is set by one knob, `level` in [0, 1] (0 = the ground truth). The errors imitate what CAM
pseudo-labels get wrong: extents blurred at the resolution of a coarse feature grid (rounded
corners, lost thin parts, bleeding across boundaries), irregular low-frequency boundary noise,
and per-class over- or under-extension. Classes absent from an image never appear, and scribbled
pixels keep their class, as in stage 1's own pseudo-labels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cdsp_core.data.files import read_label, write_label
from cdsp_core.data.layout import IGNORE, Layout, read_ids
from cdsp_core.data.scribbles import image_seed
from cdsp_core.spec import DataSpec


def degrade(
    gt: np.ndarray, level: float, num_classes: int, seed: int, scribble: np.ndarray | None = None
) -> np.ndarray:
    """A CAM-like pseudo-label (uint8, H x W) from a ground-truth map; deterministic per seed."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must lie in [0, 1], got {level}")
    h, w = gt.shape
    rng = np.random.default_rng(seed)
    onehot = (gt[None] == np.arange(num_classes)[:, None, None]).astype(np.float32)  # (K, H, W); 255 -> all 0
    stride = 1.0 + 15.0 * level  # the feature grid the extents are "seen" at
    grid = (max(1, round(w / stride)), max(1, round(h / stride)))
    # Per channel: OpenCV resizes at most 4 channels at a time with INTER_AREA.
    soft = np.stack([cv2.resize(cv2.resize(c, grid, interpolation=cv2.INTER_AREA), (w, h)) for c in onehot], -1)
    noise = rng.normal(0.0, 1.0, (num_classes, 5, 5)).astype(np.float32)
    noise = np.stack([cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC) for n in noise], -1)
    bias = rng.normal(0.0, 0.25 * level, num_classes).astype(np.float32)
    scores = soft + 0.35 * level * noise + bias
    present = np.zeros(num_classes, bool)
    if scribble is not None:
        # Like stage 1: only the classes the scribble names can appear (a dropped class cannot).
        present[np.unique(scribble[scribble < num_classes])] = True
    else:
        present[np.unique(gt[gt != IGNORE])] = True
    present[0] = True
    scores[..., ~present] = -np.inf
    label = scores.argmax(-1).astype(np.uint8)
    label[gt == IGNORE] = IGNORE
    if scribble is not None:
        scribbled = scribble != IGNORE
        label[scribbled] = scribble[scribbled]
    return label


def write_degraded(
    data: DataSpec,
    level: float,
    seed: int,
    out_dir_name: str | None = None,
    scribble_dir: Path | None = None,
    use_scribbles: bool = True,
) -> tuple[str, float]:
    """Degraded pseudo-labels of every training id under `root/<name>`; returns (name, mIoU in %).

    By default (`use_scribbles`, what the synthetic study's "external" labels are) they imitate
    stage 1's output: the scribble (`scribble_dir`, default the spec's) names the classes and keeps
    its pixels. Without it they stand for an image-level method's raw output (BMP, AFA, SEAM in the
    paper): the present classes from the ground truth, no scribble pixel pasted in.
    """
    import torch

    from cdsp_core.metrics import ConfusionMatrix

    lay = Layout.from_spec(data)
    name = out_dir_name or f"pseudo_degraded_{level:g}_seed{seed}"
    out = lay.root / name
    cm = ConfusionMatrix(data.num_classes)

    for sample_id in read_ids(lay.train_list):
        gt = read_label(lay.gt(sample_id), data.num_classes, what="ground truth")
        scribble = None
        if use_scribbles:
            path = (scribble_dir or lay.scribble_dir) / f"{sample_id}.png"
            scribble = read_label(path, data.num_classes, gt.shape, "scribble")
        label = degrade(gt, level, data.num_classes, image_seed(sample_id, seed), scribble)
        write_label(out / f"{sample_id}.png", label)
        cm.update(torch.from_numpy(label.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    return name, cm.miou()


def trivial_label(scribble: np.ndarray) -> np.ndarray:
    """The trivial pseudo-label: scribbled pixels keep their class, every other pixel is background."""
    return np.where(scribble == IGNORE, 0, scribble).astype(np.uint8)


def write_trivial(data: DataSpec, out_dir_name: str = "pseudo_trivial", scribble_dir: Path | None = None) -> str:
    """The trivial label of every training id under `root/<out_dir_name>` (the baseline every
    pseudo-label is measured against); returns the folder name."""
    lay = Layout.from_spec(data)
    for sample_id in read_ids(lay.train_list):
        scribble = read_label((scribble_dir or lay.scribble_dir) / f"{sample_id}.png", data.num_classes)
        write_label(lay.root / out_dir_name / f"{sample_id}.png", trivial_label(scribble))
    return out_dir_name
