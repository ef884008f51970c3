"""A precomputed cache of distance maps (`cdsp data distance-maps`): `scribble/`, `pseudo/`, `meta.json`.

Computing the maps per sample after augmentation is the default and exact for the augmented
labels; the cache is for slow data loaders, and its maps are resampled with the labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cdsp_core.data.files import read_label, write_label
from cdsp_core.data.layout import DatasetError, Layout, read_ids
from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
from cdsp_core.spec import DataSpec


def source_name(folder: Path, root: Path) -> str:
    """How the cache names a folder it was made from: relative to the dataset root when inside it (the
    same dataset mounted elsewhere, on a cluster's nodes, names it alike), else its absolute path."""
    folder, root = folder.expanduser().resolve(), root.expanduser().resolve()
    return str(folder.relative_to(root)) if folder.is_relative_to(root) else str(folder)


class DistanceMapCache:
    """Reads a cache folder, refusing one made with other lambdas or class count, or from other labels
    than the run reads (a shrink/drop variant of the scribbles, stage 1's own pseudo-labels): its maps
    would weight pixels by strokes or boundaries the run does not have."""

    def __init__(
        self,
        folder: Path,
        lambda_s: float,
        lambda_c: float,
        num_classes: int,
        scribble_dir: Path | None = None,
        pseudo_label_dir: Path | None = None,
        root: Path | None = None,
    ):
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{meta_path}: distance-map cache has no meta.json")
        meta = json.loads(meta_path.read_text())
        want = {"lambda_s": lambda_s, "lambda_c": lambda_c, "num_classes": num_classes}
        for key, value in want.items():
            if meta.get(key) is not None and float(meta[key]) != float(value):
                raise DatasetError(f"{folder}: cache was made with {key}={meta[key]}, the spec asks for {value}")
        self.folder = folder
        self.has_pseudo = bool(meta.get("pseudo"))
        # Caches written before their sources were recorded have none: taken as they are.
        sources = (("scribble_dir", scribble_dir, "scribbles"), ("pseudo_label_dir", pseudo_label_dir, "pseudo-labels"))
        root = folder.parent if root is None else root
        for key, used, what in sources:
            made = meta.get(key)
            if made is not None and used is not None and made != source_name(used, root):
                raise DatasetError(
                    f"{folder}: its maps were made from the {what} in {made}, this run reads {used}; make the "
                    "cache for them (cdsp data distance-maps) or unset data.distance_map_dir"
                )

    def read(self, kind: str, sample_id: str, shape: tuple[int, int]) -> np.ndarray:
        if kind == "pseudo" and not self.has_pseudo:
            raise DatasetError(f"{self.folder}: cache has no pseudo-label maps (made without --pseudo-dir)")
        # Distance maps hold 0..255, so they are read without the label-value check.
        return read_label(self.folder / kind / f"{sample_id}.png", 256, shape, what=f"{kind} distance map")


def write_distance_maps(data: DataSpec, out: Path, lambda_s: float, lambda_c: float) -> tuple[Path, int, float]:
    """Write the maps of every training id; returns (folder, count, seconds spent on the maps)."""
    lay = Layout.from_spec(data)
    folder = out if out.is_absolute() else lay.root / out
    ids = read_ids(lay.train_list)
    spent = 0.0
    for sample_id in ids:
        scribble = read_label(lay.scribble(sample_id), data.num_classes, what="scribble")
        pseudo = None
        if lay.pseudo_label_dir is not None:
            pseudo = read_label(lay.pseudo(sample_id), data.num_classes, scribble.shape, "pseudo-label")
        t = time.perf_counter()
        d_s = scribble_distance_map(scribble, lambda_s, data.num_classes)
        d_c = pseudo_boundary_distance_map(pseudo, lambda_c, data.num_classes) if pseudo is not None else None
        spent += time.perf_counter() - t
        write_label(folder / "scribble" / f"{sample_id}.png", d_s)
        if d_c is not None:
            write_label(folder / "pseudo" / f"{sample_id}.png", d_c)
    meta = {
        "lambda_s": lambda_s,
        "lambda_c": lambda_c,
        "num_classes": data.num_classes,
        "pseudo": lay.pseudo_label_dir is not None,
        # What the maps were made from: a run reading other labels refuses the cache.
        "scribble_dir": source_name(lay.scribble_dir, lay.root),
        "pseudo_label_dir": source_name(lay.pseudo_label_dir, lay.root) if lay.pseudo_label_dir is not None else None,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder, len(ids), spent
