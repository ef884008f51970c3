"""Where a pseudo-label folder's errors sit: per-class IoU, recall and precision against the ground
truth of a dataset's training split, and the largest confusions (one line per folder).

    .venv/bin/python benchmarks/label_errors.py --root data/synthetic-study-65px-8c --classes 8 \
        ours=runs/study-pt-lr0.03-e48/stage1-dense-rw-r2/pseudo_labels \
        external=data/synthetic-study-65px-8c/pseudo_external_0.5

Labels that are too large show as high recall with low precision (foreground taken from the
background); spread-out errors as recall and precision alike. Writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdsp_core.data.files import read_label
from cdsp_core.data.layout import Layout, read_ids
from cdsp_core.spec import DataSpec


def confusion(lay: Layout, folder: Path, k: int) -> np.ndarray:
    mat = np.zeros((k, k), np.int64)
    for sample_id in read_ids(lay.train_list):
        gt = read_label(lay.gt(sample_id), k)
        label = read_label(folder / f"{sample_id}.png", k, gt.shape)
        valid = gt < k
        mat += np.bincount(gt[valid].astype(int) * k + label[valid], minlength=k * k).reshape(k, k)
    return mat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="dataset root (VOC layout)")
    parser.add_argument("--classes", type=int, required=True, help="classes including background")
    parser.add_argument("folders", nargs="+", help="NAME=FOLDER of pseudo-labels")
    args = parser.parse_args()
    lay = Layout.from_spec(DataSpec(root=args.root, num_classes=args.classes))
    pct = lambda v: " ".join(f"{100 * x:3.0f}" for x in v)  # noqa: E731
    for item in args.folders:
        name, _, folder = item.partition("=")
        mat = confusion(lay, Path(folder), args.classes).astype(float)
        tp = np.diag(mat)
        iou, recall, precision = tp / (mat.sum(0) + mat.sum(1) - tp), tp / mat.sum(1), tp / mat.sum(0)
        print(f"{name}: mIoU {100 * np.nanmean(iou):.1f}")
        print(f"  IoU       {pct(iou)}\n  recall    {pct(recall)}\n  precision {pct(precision)}")
        off = mat.copy()
        np.fill_diagonal(off, 0)
        top = np.dstack(np.unravel_index(np.argsort(-off.ravel())[:5], off.shape))[0]
        print("  largest confusions (truth -> label, % of the true class):",
              ", ".join(f"{a}->{b} {100 * off[a, b] / mat[a].sum():.1f}" for a, b in top))  # fmt: skip


if __name__ == "__main__":
    main()
