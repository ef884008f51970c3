"""Distance maps: our exact O(HW) transform against a naive per-point loop, on 465 x 465 maps.

    .venv/bin/python benchmarks/distance_maps.py [--images 20] [--naive-images 3]

The naive loop is what per-point code does (for every scribble point, the distance of every
pixel to it, keep the minimum); it is checked to give identical maps before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table, write_results
from cdsp_core.distance import (
    naive_scribble_distance_map,
    pseudo_boundary_distance_map,
    scribble_distance_map,
)

SIZE = 465


def scribble_like(rng: np.random.Generator, k: int = 21) -> np.ndarray:
    """A VOC-like scribble: a few 3 px strokes of random classes and background."""
    s = np.full((SIZE, SIZE), 255, np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        pts = np.cumsum(rng.normal(0, 25, (int(rng.integers(4, 9)), 2)), 0) + rng.uniform(80, 385, 2)
        line = np.zeros_like(s)
        cv2.polylines(line, [pts.astype(np.int32).reshape(-1, 1, 2)], False, 1, 1)
        s[cv2.dilate(line, np.ones((3, 3), np.uint8)) > 0] = int(rng.integers(0, k))
    return s


def pseudo_like(rng: np.random.Generator, k: int = 21) -> np.ndarray:
    p = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        centre = tuple(int(v) for v in rng.uniform(60, 400, 2))
        axes = tuple(int(v) for v in rng.uniform(30, 140, 2))
        cv2.ellipse(p, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(1, k)), -1)
    return p


def time_ms(fn, *args, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return 1000 * (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="maps timed with our transform")
    parser.add_argument("--naive-images", type=int, default=3, help="maps timed with the naive loop (slow)")
    parser.add_argument("--lambda-s", type=float, default=2.0)
    parser.add_argument("--lambda-c", type=float, default=7.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scribbles = [scribble_like(rng) for _ in range(args.images)]
    pseudos = [pseudo_like(rng) for _ in range(args.images)]
    points = [int(((s >= 1) & (s < 21)).sum()) for s in scribbles]
    ours_s = [time_ms(scribble_distance_map, s, args.lambda_s, 21, repeat=5) for s in scribbles]
    ours_c = [time_ms(pseudo_boundary_distance_map, p, args.lambda_c, 21, repeat=5) for p in pseudos]
    naive = []
    for s in scribbles[: args.naive_images]:
        assert np.array_equal(
            naive_scribble_distance_map(s, args.lambda_s, 21), scribble_distance_map(s, args.lambda_s, 21)
        )
        naive.append(time_ms(naive_scribble_distance_map, s, args.lambda_s, 21))
    ours_ms = statistics.median(ours_s)
    naive_ms = statistics.median(naive)
    rows = [
        ["scribble map d_s, ours (exact EDT)", f"{ours_ms:.2f}", args.images],
        ["boundary map d_c, ours (contour + exact EDT)", f"{statistics.median(ours_c):.2f}", args.images],
        ["scribble map d_s, naive per-point loop", f"{naive_ms:.0f}", args.naive_images],
    ]
    md = table(["map (465 x 465)", "ms per image (median)", "images"], rows)
    md += (
        f"\n\nSpeed-up of ours over the naive loop: **{naive_ms / ours_ms:,.0f}x** "
        f"(identical maps; {statistics.median(points):.0f} foreground scribble pixels per image, median).\n"
    )
    print(md)
    payload = {
        "size": SIZE,
        "ours_scribble_ms": ours_s,
        "ours_boundary_ms": ours_c,
        "naive_scribble_ms": naive,
        "speedup": naive_ms / ours_ms,
        "scribble_points": points,
    }
    json_path, md_path = write_results("distance_maps", torch.device("cpu"), payload, md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
