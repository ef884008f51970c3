"""Scribble variants for the robustness study (after URSS): shrink and drop.

A stroke is a connected component (8-connectivity) of one class. `shrink` keeps the middle
(1 - r) of every stroke's length, measured along the stroke (geodesic distance inside the
component, so curved strokes shrink along their curve); r = 1 keeps one pixel per stroke.
`drop` removes each foreground stroke with probability r. Variants are written in the same
layout and cached by (kind, ratio, seed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from cdsp_core.data.files import read_label, write_label
from cdsp_core.data.layout import IGNORE, DatasetError, Layout, read_ids
from cdsp_core.spec import DataSpec

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) > (0, 0)]


def strokes(scribble: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, (N, 2) pixel coordinates) of every stroke, in class then raster order."""
    out = []
    for cls in np.unique(scribble):
        if cls == IGNORE:
            continue
        n, comp = cv2.connectedComponents((scribble == cls).astype(np.uint8), connectivity=8)
        for i in range(1, n):
            out.append((int(cls), np.argwhere(comp == i)))
    return out


def _geodesic(points: np.ndarray, source: int) -> np.ndarray:
    """Geodesic (8-connected, unit steps) distance from one pixel to every pixel of a stroke."""
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(points)}
    rows, cols = [], []
    for i, (y, x) in enumerate(points):
        for dy, dx in _OFFSETS:
            j = index.get((int(y) + dy, int(x) + dx))
            if j is not None:
                rows.append(i)
                cols.append(j)
    n = len(points)
    graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    return csgraph.shortest_path(graph, directed=False, unweighted=True, indices=source)


def _shrink_stroke(points: np.ndarray, ratio: float) -> np.ndarray:
    if len(points) == 1:
        return points
    # Farthest-point twice: a ~ one end of the stroke, g = distance along the stroke from it.
    a = int(np.argmax(_geodesic(points, 0)))
    g = _geodesic(points, a)
    length = float(g.max())
    mid = length / 2
    if ratio >= 1.0 or length == 0:
        return points[[int(np.argmin(np.abs(g - mid)))]]
    half = (1.0 - ratio) * length / 2
    keep = np.abs(g - mid) <= half
    if not keep.any():
        keep[int(np.argmin(np.abs(g - mid)))] = True
    return points[keep]


def shrink(scribble: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Shorten every stroke (background strokes too) to the middle (1 - ratio) of its length.

    Deterministic: the geometry decides, so `seed` does not change the result; it is accepted
    so that both variants share one signature.
    """
    _check_ratio(ratio)
    if ratio == 0:
        return scribble.copy()
    out = np.full_like(scribble, IGNORE)
    for cls, points in strokes(scribble):
        kept = _shrink_stroke(points, ratio)
        out[kept[:, 0], kept[:, 1]] = cls
    return out


def drop(scribble: np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """Remove each foreground stroke with probability `ratio`; background strokes stay."""
    _check_ratio(ratio)
    rng = np.random.default_rng(seed)
    out = scribble.copy()
    for cls, points in strokes(scribble):
        if cls == 0:
            continue
        if rng.random() < ratio:
            out[points[:, 0], points[:, 1]] = IGNORE
    return out


def image_seed(sample_id: str, seed: int) -> int:
    """A per-image seed that is stable across processes and Python versions."""
    return (zlib.crc32(sample_id.encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")


def variant_name(scribble_dir: str, shrink_ratio: float, drop_ratio: float, seed: int) -> str:
    parts = [Path(scribble_dir).name]
    if drop_ratio:
        parts.append(f"drop{drop_ratio:g}")
    if shrink_ratio:
        parts.append(f"shrink{shrink_ratio:g}")
    return "@".join(parts) + f"-seed{seed}"


def make_variant(
    data: DataSpec, shrink_ratio: float, drop_ratio: float, seed: int, out_dir: Path | None = None
) -> Path:
    """Write (or reuse) the scribble variant of the training ids; returns its folder.

    Drop is applied before shrink. The folder is created atomically, so concurrent workers
    asking for the same variant never see a half-written one.
    """
    lay = Layout.from_spec(data)
    ids = read_ids(lay.train_list)
    # What the variant is made of: its recipe, the source folder and the training ids. A complete
    # variant is never replaced (other runs may be reading it): one of other scribbles or another
    # training list under the same name gets a folder of its own, named with a digest of its recipe.
    made_of = (
        f"shrink={shrink_ratio} drop={drop_ratio} seed={seed}\nsource={data.scribble_dir}\n"
        f"ids={hashlib.sha256(chr(10).join(ids).encode()).hexdigest()[:16]} ({len(ids)})\n"
    )
    name = variant_name(data.scribble_dir, shrink_ratio, drop_ratio, seed)
    digest = hashlib.sha256(made_of.encode()).hexdigest()[:8]
    candidates = [out_dir] if out_dir is not None else [lay.root / name, lay.root / f"{name}-{digest}"]
    for target in candidates:
        complete = target / ".complete"
        if not complete.is_file():
            break  # absent or half-written: made here
        stamp = complete.read_text()
        if stamp == made_of or ("source=" not in stamp and target == candidates[0]):  # older: recipe only
            return target
    else:
        raise DatasetError(
            f"{target}: holds a scribble variant made of other scribbles ({stamp.strip()!r}); move it away"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".variant-", dir=target.parent))
    try:
        for sample_id in ids:
            scribble = read_label(lay.scribble(sample_id), data.num_classes, what="scribble")
            s = image_seed(sample_id, seed)
            if drop_ratio:
                scribble = drop(scribble, drop_ratio, s)
            if shrink_ratio:
                scribble = shrink(scribble, shrink_ratio, s)
            write_label(tmp / f"{sample_id}.png", scribble)
        (tmp / ".complete").write_text(made_of)
        try:
            os.rename(tmp, target)
        except OSError:
            done = target / ".complete"
            if done.is_file() and done.read_text() == made_of:
                pass  # another process made the same variant first
            elif not done.is_file():  # someone else's half-written folder
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
            else:
                raise DatasetError(f"{target}: another process made a variant of other scribbles there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def scribble_folder(data: DataSpec) -> Path:
    """The scribble folder a run uses: the base one, or its (cached) shrink/drop variant."""
    if not data.shrink_ratio and not data.drop_ratio:
        return Layout.from_spec(data).scribble_dir
    return make_variant(data, data.shrink_ratio, data.drop_ratio, data.variant_seed)
