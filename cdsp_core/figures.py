"""Figures: dataset previews, sample grids (paper Fig. 3/5) and metric curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cdsp_core.data.layout import IGNORE


def label_colours(n: int = 256) -> np.ndarray:
    """The VOC colour map: (n, 3) uint8, built from the bits of the class index; 255 is white."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    if n > IGNORE:
        cmap[IGNORE] = (255, 255, 255)
    return cmap


_CMAP = label_colours()


def colourize(label: np.ndarray) -> np.ndarray:
    """uint8 (H, W) label map -> RGB (H, W, 3)."""
    return _CMAP[np.asarray(label, dtype=np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The image with the labelled (non-255) pixels painted in class colours."""
    out = image.astype(np.float32).copy()
    m = label != IGNORE
    out[m] = (1 - alpha) * out[m] + alpha * colourize(label)[m]
    return out.astype(np.uint8)


def save_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: Path, cell: float = 1.8) -> Path:
    """Save a grid of images: one row per sample, one titled column per panel."""
    n_rows, n_cols = len(rows), len(titles)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            ax.imshow(
                panel,
                cmap="gray" if panel.ndim == 2 else None,
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    points: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Line plot of named (x, y) series, plus named single points (markers, in the legend)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", ms=3, label=name)
    for name, point in (points or {}).items():
        ax.plot([point[0]], [point[1]], marker="*", ms=9, linestyle="none", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) + len(points or {}) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_heatmap(
    values: np.ndarray,
    rows: Sequence[Any],
    cols: Sequence[Any],
    path: Path,
    ylabel: str,
    xlabel: str,
    title: str = "",
) -> Path:
    """Annotated heatmap of a (len(rows), len(cols)) array (NaN cells stay blank), e.g. mIoU over λs x λc."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.7 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c:g}" if isinstance(c, int | float) else str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" if isinstance(r, int | float) else str(r) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = values[np.isfinite(values)]
    middle = float(finite.mean()) if finite.size else 0.0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if v > middle else "white")
    fig.colorbar(im, ax=ax)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dataset_preview(
    root: Path,
    num_classes: int,
    path: Path,
    count: int = 4,
    lambda_s: float = 1.0,
    lambda_c: float = 6.0,
) -> Path:
    """First few training images: image, ground truth, scribble, d_s, and d_c on the ground truth."""
    from cdsp_core.data.files import read_image, read_label
    from cdsp_core.data.layout import read_ids
    from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map

    root = Path(root)
    rows = []
    for sample_id in read_ids(root / "ImageSets/SegmentationAug/train.txt")[:count]:
        image = read_image(root / "JPEGImages" / f"{sample_id}.jpg")
        gt = read_label(root / "SegmentationClassAug" / f"{sample_id}.png", num_classes)
        scribble = read_label(root / "pascal_2012_scribble" / f"{sample_id}.png", num_classes)
        rows.append([
            image, colourize(gt), overlay(image, scribble),
            scribble_distance_map(scribble, lambda_s, num_classes),
            pseudo_boundary_distance_map(gt, lambda_c, num_classes),
        ])  # fmt: skip
    titles = [
        "image",
        "ground truth",
        "scribble",
        f"d_s (λs={lambda_s:g})",
        f"d_c on truth (λc={lambda_c:g})",
    ]
    return save_grid(rows, titles, path)


def run_figures(
    spec: Any,
    run: str,
    model: Any | None,
    classifier: Any | None,
    pseudo_dir: Path | None,
    scribble_dir: Path,
    device: Any,
    count: int = 4,
) -> list[str]:
    """figures/samples.png (image + scribble, pseudo-label, d_s, d_c, prediction, truth, as the
    paper's Fig. 3/5, on validation images), figures/miou.png and figures/loss.png."""
    import tempfile

    import torch

    from cdsp_core import runs
    from cdsp_core.cam import class_probs, present_classes, pseudo_label, refine
    from cdsp_core.data.files import read_image, read_label
    from cdsp_core.data.layout import Layout, read_ids
    from cdsp_core.data.transforms import normalize
    from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
    from cdsp_core.evaluation import predict_probs
    from cdsp_core.runner import unwrap

    k = spec.data.num_classes
    lay = Layout.from_spec(spec.data)
    out = Path(tempfile.mkdtemp(prefix="cdsp-fig-"))
    blank = None
    rows = []
    for sample_id in read_ids(lay.val_list)[:count]:
        image = read_image(lay.image(sample_id))
        blank = np.full(image.shape[:2], IGNORE, np.uint8)
        x = normalize(torch.from_numpy(image).permute(2, 0, 1)).to(device)
        scribble_path = next(
            (p for p in (scribble_dir / f"{sample_id}.png", lay.scribble(sample_id)) if p.is_file()), None
        )
        scribble = read_label(scribble_path, k, image.shape[:2]) if scribble_path else blank
        pseudo = blank
        if pseudo_dir is not None and (pseudo_dir / f"{sample_id}.png").is_file():
            pseudo = read_label(pseudo_dir / f"{sample_id}.png", k, image.shape[:2])
        elif classifier is not None:
            net = unwrap(classifier).eval().to(device)
            s1, scrib = spec.stage1, torch.from_numpy(scribble)
            probs = class_probs(net, x[None], present_classes(scrib, k)[None].to(device), s1)[0].float().cpu()
            if s1.refine == "random_walk":
                probs = refine(x.cpu(), probs, scrib, s1)
            pseudo = pseudo_label(probs, scrib, s1.background_bias).numpy()
        pred = blank
        if model is not None:
            net = unwrap(model).eval()
            pred = predict_probs(net, x[None]).argmax(1)[0].to(torch.uint8).cpu().numpy()
        gt = read_label(lay.gt(sample_id), k, image.shape[:2]) if lay.gt(sample_id).is_file() else blank
        rows.append([
            overlay(image, scribble), colourize(pseudo),
            scribble_distance_map(scribble, spec.stage2.lambda_s, k),
            pseudo_boundary_distance_map(pseudo, spec.stage2.lambda_c, k) if pseudo is not blank else blank,
            colourize(pred), colourize(gt),
        ])  # fmt: skip
    written = []
    if rows:
        titles = ["image + scribble", "pseudo-label", "d_s", "d_c", "prediction", "ground truth"]
        save_grid(rows, titles, out / "samples.png")
        written.append("samples.png")
    metrics = runs.read_jsonl(runs.join(run, runs.METRICS))
    s2 = [r for r in metrics if r.get("stage") == "stage2" and r.get("miou") is not None]
    if s2:
        save_curves(
            {"val mIoU": ([r["epoch"] for r in s2], [r["miou"] for r in s2])},
            out / "miou.png",
            "epoch",
            "mIoU (%)",
            "stage 2 validation mIoU",
        )
        written.append("miou.png")
    series = {}
    for stage in ("stage1", "stage2"):
        rows_ = [r for r in metrics if r.get("stage") == stage and "loss" in r]
        if rows_:
            series[f"{stage} loss"] = ([r["epoch"] for r in rows_], [r["loss"] for r in rows_])
    if series:
        save_curves(series, out / "loss.png", "epoch", "training loss")
        written.append("loss.png")
    for name in written:
        runs.upload(out / name, runs.join(run, runs.FIGURES, name))
    from cdsp_core import tb

    tb.export(run, out / "samples.png" if "samples.png" in written else None)  # tensorboard --logdir RUN
    return written
