"""The synthetic dataset generator: layout, determinism, label semantics, stroke geometry and difficulty."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from cdsp_core.data import synthetic
from cdsp_core.data.scribbles import strokes
from cdsp_core.data.synthetic import SHAPES, TEXTURES, class_styles, generate, render

K, SIZE = 3, 64  # the tiny_synth fixture (tests/conftest.py)


def ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/SegmentationAug" / f"{split}.txt").read_text().split()


def read(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None, path
    return arr


def load(root: Path, split: str = "train"):
    for sid in ids(root, split):
        yield (
            sid,
            read(root / "JPEGImages" / f"{sid}.jpg"),
            read(root / "SegmentationClassAug" / f"{sid}.png"),
            read(root / "pascal_2012_scribble" / f"{sid}.png"),
        )


def render_with_objects(index: int, size: int, num_classes: int, seed: int, monkeypatch) -> tuple:
    """render() plus the full (unoccluded) mask of each object, in drawing order."""
    masks: list[np.ndarray] = []
    original = synthetic._shape_mask

    def recording(*args, **kwargs):
        masks.append(original(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(synthetic, "_shape_mask", recording)
    image, gt, scribble = render(index, size, num_classes, seed)
    monkeypatch.setattr(synthetic, "_shape_mask", original)
    return image, gt, scribble, masks


# ---- layout and files ------------------------------------------------------------------------------


def test_layout_and_sizes(tiny_synth):
    assert ids(tiny_synth, "train") == [f"train_{i:05d}" for i in range(8)]
    assert ids(tiny_synth, "val") == [f"val_{i:05d}" for i in range(4)]
    for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClassAug", "png"), ("pascal_2012_scribble", "png")):
        names = sorted(p.name for p in (tiny_synth / folder).iterdir())
        assert names == sorted(f"{i}.{ext}" for i in ids(tiny_synth, "train") + ids(tiny_synth, "val"))
    for split in ("train", "val"):
        for _, image, gt, scribble in load(tiny_synth, split):
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            assert gt.shape == scribble.shape == (SIZE, SIZE)  # single-channel PNGs
            assert gt.dtype == scribble.dtype == np.uint8


def test_label_values(tiny_synth):
    for split in ("train", "val"):
        for sid, _, gt, scribble in load(tiny_synth, split):
            assert set(np.unique(gt)) <= set(range(K)), sid
            assert set(np.unique(scribble)) <= {*range(K), 255}, sid
            assert (gt > 0).any(), f"{sid} has no object"
            assert (scribble != 255).mean() < 0.3, f"{sid}: scribbles should be sparse"


def test_scribbles_lie_on_their_class(tiny_synth):
    bg_strokes = 0
    for sid, _, gt, scribble in load(tiny_synth):
        fg = (scribble != 255) & (scribble != 0)
        assert fg.any(), f"{sid} has no foreground scribble"
        assert np.array_equal(scribble[fg], gt[fg]), f"{sid}: a foreground scribble pixel is on another class"
        assert (gt[scribble == 0] == 0).all(), f"{sid}: a background scribble pixel is on an object"
        bg_strokes += (scribble == 0).any()
    assert bg_strokes >= 6  # background strokes in (nearly) every image


def test_meta_json(tiny_synth):
    meta = json.loads((tiny_synth / "meta.json").read_text())
    assert meta["num_classes"] == K and meta["size"] == SIZE and meta["seed"] == 0
    assert (meta["num_train"], meta["num_val"]) == (8, 4)
    assert meta["classes"] == ["background"] + [s.name for s in class_styles(K, 0)]
    scribbled = [(s != 255).sum() for _, _, _, s in load(tiny_synth)]
    assert meta["scribbled_percent"] == pytest.approx(100 * sum(scribbled) / (8 * SIZE * SIZE))
    assert 1 < meta["scribbled_percent"] < 30
    assert meta["seconds"] >= 0


# ---- determinism ----------------------------------------------------------------------------------


def test_deterministic_per_seed_and_prefix_stable(tmp_path, tiny_synth):
    same = generate(tmp_path / "same", num_train=5, num_val=2, size=SIZE, num_classes=K, seed=0)
    generate(tmp_path / "other", num_train=5, num_val=2, size=SIZE, num_classes=K, seed=1)
    assert same["num_train"] == 5
    for split, n in (("train", 5), ("val", 2)):
        for sid in ids(tmp_path / "same", split)[:n]:
            for folder, ext in (
                ("SegmentationClassAug", "png"),
                ("pascal_2012_scribble", "png"),
                ("JPEGImages", "jpg"),
            ):
                name = f"{folder}/{sid}.{ext}"
                # tiny_synth has 8 train / 4 val images: image i is the same whatever the split sizes.
                assert (tmp_path / "same" / name).read_bytes() == (tiny_synth / name).read_bytes(), name
    differ = sum(
        (tmp_path / "same" / f"SegmentationClassAug/{sid}.png").read_bytes()
        != (tmp_path / "other" / f"SegmentationClassAug/{sid}.png").read_bytes()
        for sid in ids(tmp_path / "same", "train")
    )
    assert differ == 5


def test_render_is_pure():
    a, b = render(3, 48, 4, 7), render(3, 48, 4, 7)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(render(4, 48, 4, 7)[1], a[1])


def test_train_and_val_images_differ(tiny_synth):
    train = {read(tiny_synth / f"SegmentationClassAug/{s}.png").tobytes() for s in ids(tiny_synth, "train")}
    val = {read(tiny_synth / f"SegmentationClassAug/{s}.png").tobytes() for s in ids(tiny_synth, "val")}
    assert not train & val


# ---- geometry of objects and strokes -----------------------------------------------------------------


def test_strokes_are_three_pixels_wide(tiny_synth):
    """A 3 px stroke survives a 3x3 opening (a 1-2 px one vanishes) and holds almost no 4x4 block."""
    box3, box4 = np.ones((3, 3), np.uint8), np.ones((4, 4), np.uint8)
    area, kept, fat = Counter(), Counter(), Counter()
    for sid, _, _, scribble in load(tiny_synth):
        for cls, pts in strokes(scribble):
            m = np.zeros(scribble.shape, np.uint8)
            m[pts[:, 0], pts[:, 1]] = 1
            opened = int(cv2.morphologyEx(m, cv2.MORPH_OPEN, box3).sum())
            kind = "object" if cls > 0 else "background"
            area[kind] += len(pts)
            kept[kind] += opened
            fat[kind] += int(cv2.erode(m, box4, borderType=cv2.BORDER_CONSTANT, borderValue=0).sum())
            if cls > 0 and len(pts) >= 20:
                assert opened >= 0.85 * len(pts), f"{sid}: a class-{cls} stroke is thinner than 3 px"
    for kind in ("object", "background"):
        assert area[kind] >= 500, kind
        assert kept[kind] >= 0.95 * area[kind], f"{kind} strokes thinner than 3 px"
        # A 5 px stroke (OpenCV's thickness=3) puts ~15% of its pixels inside a 4x4 block.
        assert fat[kind] <= 0.03 * area[kind], f"{kind} strokes wider than 3 px"


def test_several_objects_occlusion_and_a_stroke_per_visible_object(monkeypatch):
    n_objects, occluded, visible_objects, scribbled = [], 0, 0, 0
    for index in range(8):
        _, gt, scribble, masks = render_with_objects(index, SIZE, K, 0, monkeypatch)
        n_objects.append(len(masks))
        for k, mask in enumerate(masks):
            later = np.logical_or.reduce(masks[k + 1 :]) if k + 1 < len(masks) else np.zeros_like(mask)
            visible = mask & ~later
            occluded += bool((mask & later).any())
            if visible.sum() >= 60:
                cls = int(np.bincount(gt[visible]).argmax())
                visible_objects += 1
                scribbled += bool((scribble[visible] == cls).any())
        union = np.logical_or.reduce(masks)
        assert np.array_equal(gt > 0, union)
    assert min(n_objects) >= 2 and max(n_objects) >= 3
    assert occluded >= 2
    assert scribbled >= 0.9 * visible_objects and visible_objects >= 12


def test_one_object_per_image_variant(tmp_path):
    """The LoRM study's variant: one object per image, so no image holds two classes."""
    stats = generate(tmp_path, num_train=12, num_val=2, size=SIZE, num_classes=K, seed=0, objects=(1, 1))
    assert stats["objects"] == [1, 1]
    for i in range(12):
        gt = read(tmp_path / f"SegmentationClassAug/train_{i:05d}.png")
        assert len(set(np.unique(gt)) - {0}) == 1
    # The default draws exactly what it drew before the option existed (same images per seed).
    image, _, _ = render(3, SIZE, K, 0)
    assert np.array_equal(image, render(3, SIZE, K, 0, objects=(2, 3))[0])


def test_colour_alone_does_not_segment(tiny_synth):
    """A nearest-mean-colour classifier per pixel is far from segmenting the images."""
    pixels, labels = [], []
    for _, image, gt, _ in load(tiny_synth):
        pixels.append(image.reshape(-1, 3).astype(np.float64))
        labels.append(gt.ravel())
    x, y = np.concatenate(pixels), np.concatenate(labels)
    means = np.stack([x[y == c].mean(0) for c in range(K)])
    pred = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y).mean()
    recall = [(pred[y == c] == c).mean() for c in range(1, K)]
    assert accuracy < 0.85
    assert min(recall) < 0.7


@pytest.mark.parametrize("num_classes", [3, 9, 17, 21, 49])
def test_class_styles_are_distinct(num_classes):
    styles = class_styles(num_classes, 0)
    assert len(styles) == num_classes - 1
    pairs = [(s.shape, s.texture) for s in styles]
    assert len(set(pairs)) == len(pairs)
    assert len({s.name for s in styles}) == len(styles)
    assert {s.shape for s in styles} <= set(SHAPES) and {s.texture for s in styles} <= set(TEXTURES)
    if num_classes - 1 <= len(SHAPES):
        assert len({s.shape for s in styles}) == num_classes - 1  # small K: one shape family each
    assert all(s.colours[0] != s.colours[1] for s in styles)


def test_class_styles_limit():
    with pytest.raises(ValueError, match="at most 49 classes"):
        class_styles(50, 0)


def test_objects_of_a_class_follow_its_shape_family(monkeypatch):
    """Class 1 (ellipse) objects are convex; class 2 (rectangle) objects nearly fill their rotated box."""
    solidity: dict[int, list[float]] = {1: [], 2: []}
    for index in range(6):
        _, gt, _, masks = render_with_objects(index, SIZE, K, 0, monkeypatch)
        for mask in masks:
            cls = int(np.bincount(gt[mask]).argmax()) if (gt[mask] > 0).any() else 0
            contour = max(cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0], key=len)
            area = mask.sum()
            if cls in solidity and area > 100 and not (mask[[0, -1]].any() or mask[:, [0, -1]].any()):
                (_, _), (w, h), _ = cv2.minAreaRect(contour)
                solidity[cls].append(area / max(w * h, 1))
    assert solidity[1] and solidity[2]
    assert max(solidity[1]) < 0.9  # an ellipse covers pi/4 of its box
    assert min(solidity[2]) > 0.85


# ---- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 31}, "at least 32"),
        ({"num_train": 0}, "at least one train"),
        ({"num_val": 0}, "at least one train and one val"),
        ({"num_classes": 1}, "at least 2"),
        ({"num_classes": 50}, "at most 49"),
        ({"objects": (0, 2)}, "1 <= min <= max"),
        ({"objects": (3, 2)}, "1 <= min <= max"),
    ],
)
def test_argument_validation(tmp_path, kwargs, match):
    args = {"num_train": 1, "num_val": 1, "size": 32, "num_classes": 3, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        generate(tmp_path / "x", **args)


def test_smallest_valid_dataset(tmp_path):
    stats = generate(tmp_path, num_train=1, num_val=1, size=32, num_classes=2, seed=5)
    assert stats["classes"][0] == "background" and len(stats["classes"]) == 2
    gt = read(tmp_path / "SegmentationClassAug/train_00000.png")
    assert gt.shape == (32, 32) and set(np.unique(gt)) <= {0, 1}
