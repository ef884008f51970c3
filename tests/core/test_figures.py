"""Figure helpers: the VOC colour map (golden values), overlays and saved PNGs."""

from __future__ import annotations

import cv2
import numpy as np

from cdsp_core.figures import colourize, dataset_preview, label_colours, overlay, save_curves, save_grid


def test_voc_colour_map_golden():
    cmap = label_colours()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    golden = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
              12: (64, 0, 128), 15: (192, 128, 128), 20: (0, 64, 128), 255: (255, 255, 255)}  # fmt: skip
    for index, rgb in golden.items():
        assert tuple(cmap[index]) == rgb, index
    assert len({tuple(c) for c in cmap[:21]}) == 21
    assert tuple(label_colours(21)[20]) == (0, 64, 128)


def test_colourize_and_overlay():
    label = np.array([[0, 1], [255, 15]], np.uint8)
    rgb = colourize(label)
    assert rgb.shape == (2, 2, 3) and tuple(rgb[1, 1]) == (192, 128, 128)
    image = np.full((2, 2, 3), 50, np.uint8)
    out = overlay(image, label)
    assert tuple(out[1, 0]) == (50, 50, 50), "unlabelled pixels keep the image"
    assert tuple(out[0, 1]) == (128, 0, 0)
    half = overlay(image, label, alpha=0.5)
    assert tuple(half[0, 1]) == (89, 25, 25)
    assert (image == 50).all()


def test_save_grid_and_curves(tmp_path):
    rows = [[np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 255, np.uint8)] for _ in range(2)]
    grid = save_grid(rows, ["a", "b"], tmp_path / "sub" / "grid.png")
    img = cv2.imread(str(grid))
    assert img is not None and img.shape[0] > 100
    curves = save_curves({"miou": ([1, 2, 3], [10.0, 20.0, 25.0]), "loss": ([1, 2], [1.0, 0.5])}, tmp_path / "c.png",
                         "epoch", "value", "title")  # fmt: skip
    assert cv2.imread(str(curves)) is not None


def test_dataset_preview(tiny_synth, tmp_path):
    path = dataset_preview(tiny_synth, 3, tmp_path / "preview.png", count=2)
    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] > img.shape[0]  # five panels across, two rows
