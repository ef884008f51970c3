"""Where pseudo-label folders' errors sit: per-class IoU, recall and precision against the ground
truth of a dataset's training split, and each folder's largest confusions.

    .venv/bin/python benchmarks/label_errors.py --root data/synthetic-study-65px-8c --classes 8 \
        ours=runs/study-pt-lr0.03-e48/stage1-dense-rw-r2/pseudo_labels \
        external=data/synthetic-study-65px-8c/pseudo_external_0.5

Labels that are too large show as high recall with low precision (foreground taken from the
background); spread-out errors as recall and precision alike. Prints one table per folder and
writes them to benchmarks/results/label_errors-<tag>.{md,json} (`--tag`, default the dataset
folder's name). Class names come from the dataset's meta.json where it has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_results
from cdsp_core.data.files import read_label
from cdsp_core.data.layout import Layout, read_ids
from cdsp_core.spec import DataSpec


def confusion(lay: Layout, folder: Path, k: int) -> np.ndarray:
    """Rows: the true class; columns: the folder's label, and a last column for pixels it leaves
    unlabelled (a miss, as in the project's ConfusionMatrix); pixels of the training split whose truth
    is ignore are left out."""
    mat = np.zeros((k, k + 1), np.int64)
    for sample_id in read_ids(lay.train_list):
        path = folder / f"{sample_id}.png"
        if not path.is_file():
            raise SystemExit(f"error: {folder}: no pseudo-label for training image {sample_id!r} ({path.name})")
        gt = read_label(lay.gt(sample_id), k)
        label = read_label(path, k, gt.shape)
        valid = gt < k
        given = np.minimum(label[valid].astype(int), k)  # any label outside 0..k-1: no class
        mat += np.bincount(gt[valid].astype(int) * (k + 1) + given, minlength=k * (k + 1)).reshape(k, k + 1)
    return mat


def class_errors(mat: np.ndarray) -> dict[str, Any]:
    """Per-class IoU, recall and precision (None where a class never occurs), mIoU, and the five largest
    confusions by share of the true class's pixels, as (truth, label, share); label k is "no class". `mat` is
    K x K, or K x (K + 1) with the unlabelled pixels last."""
    mat = mat.astype(float)
    k = len(mat)
    tp = np.diag(mat[:, :k])
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (mat[:, :k].sum(0) + mat.sum(1) - tp)
        recall, precision = tp / mat.sum(1), tp / mat[:, :k].sum(0)
    off = mat.copy()
    np.fill_diagonal(off, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(off / mat.sum(1, keepdims=True))
    top = [divmod(int(i), off.shape[1]) for i in np.argsort(-share.ravel(), kind="stable")[:5]]
    listed = lambda v: [None if np.isnan(x) else float(x) for x in v]  # noqa: E731 (JSON has no NaN)
    return {
        "miou": float(np.nanmean(iou)) if not np.isnan(iou).all() else None,
        "iou": listed(iou),
        "recall": listed(recall),
        "precision": listed(precision),
        "confusions": [(a, b, float(share[a, b])) for a, b in top if off[a, b] > 0],
    }


def class_names(root: Path, k: int) -> list[str]:
    meta = root / "meta.json"
    names = json.loads(meta.read_text()).get("classes") if meta.is_file() else None
    return list(names) if isinstance(names, list) and len(names) == k else [str(c) for c in range(k)]


def pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="dataset root (VOC layout)")
    parser.add_argument("--classes", type=int, required=True, help="classes including background")
    parser.add_argument("--tag", help="the result files' suffix (default: the dataset folder's name)")
    parser.add_argument("folders", nargs="+", help="NAME=FOLDER of pseudo-labels")
    args = parser.parse_args()
    root = Path(args.root)
    lay = Layout.from_spec(DataSpec(root=str(root), num_classes=args.classes))
    names = class_names(root, args.classes)
    found: dict[str, dict[str, Any]] = {}
    blocks = []
    for item in args.folders:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"expected NAME=FOLDER, got {item!r}")
        if not Path(folder).is_dir():
            parser.error(f"{name}: no such folder: {folder}")
        errs = class_errors(confusion(lay, Path(folder), args.classes))
        errs["folder"] = folder
        found[name] = errs
        rows = [
            [names[c], pct(errs["iou"][c]), pct(errs["recall"][c]), pct(errs["precision"][c])]
            for c in range(args.classes)
        ]
        named = [*names, "no class"]
        confused = ", ".join(f"{named[a]} -> {named[b]} {100 * s:.1f} %" for a, b, s in errs["confusions"])
        blocks.append(
            f"## {name}: mIoU {pct(errs['miou'], 1)}\n\nFolder: `{folder}`\n\n"
            + table(["class", "IoU %", "recall %", "precision %"], rows)
            + f"\nLargest confusions (truth -> label, share of the true class): {confused or 'none'}\n"
        )
    markdown = (
        f"Pseudo-labels against the ground truth of the training split of `{root}` ({args.classes} classes). "
        "Recall: the share of a class's pixels labelled with it; precision: the share of the pixels labelled "
        "with a class that are that class.\n\n" + "\n".join(blocks)
    )
    print(markdown)
    json_path, md_path = write_results(
        "label_errors", torch.device("cpu"), {"root": str(root), "classes": names, "folders": found},
        markdown, tag=args.tag or root.name,
    )  # fmt: skip
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
