"""Scribble variants: shrink along the stroke's geodesic middle, seeded drop, cached variant folders."""

from __future__ import annotations

import shutil
import zlib

import cv2
import numpy as np
import pytest

from cdsp_core.data import scribbles
from cdsp_core.data.files import read_label, write_label
from cdsp_core.data.scribbles import drop, image_seed, make_variant, scribble_folder, shrink, strokes, variant_name
from cdsp_core.spec import DataSpec

IGNORE = 255


def horizontal(cls: int = 1) -> np.ndarray:
    """One 3 px wide, 41 px long horizontal stroke: rows 9-11, columns 5-45 (middle column 25)."""
    s = np.full((20, 60), IGNORE, np.uint8)
    s[9:12, 5:46] = cls
    return s


def l_shape() -> np.ndarray:
    """An L: a horizontal arm (rows 10-12, cols 5-35) and a vertical arm (rows 10-40, cols 33-35)."""
    s = np.full((50, 50), IGNORE, np.uint8)
    s[10:13, 5:36] = 2
    s[10:41, 33:36] = 2
    return s


def u_shape() -> np.ndarray:
    """A U of class 1: two 35 px arms (cols 5-7 and 27-29) joined by a bottom bar (rows 37-39)."""
    s = np.full((50, 50), IGNORE, np.uint8)
    s[5:40, 5:8] = 1
    s[37:40, 5:30] = 1
    s[5:40, 27:30] = 1
    return s


def columns(s: np.ndarray) -> list[int]:
    return sorted(set(np.nonzero(s != IGNORE)[1].tolist()))


def n_components(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def dots(classes: list[int], shape=(40, 80)) -> np.ndarray:
    """Separate 2x2 strokes, one per entry of `classes`, on a grid."""
    s = np.full(shape, IGNORE, np.uint8)
    for i, cls in enumerate(classes):
        y, x = 4 * (i // 16), 5 * (i % 16)
        s[y : y + 2, x : x + 2] = cls
    return s


# ---- shrink -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "first", "last"),
    [
        # The stroke is 40 steps long end to end; pixels within (1 - r) * 40 / 2 steps of the
        # geodesic middle (column 25) are kept, all three rows of each kept column.
        (0.25, 10, 40),
        (0.5, 15, 35),
        (0.75, 20, 30),
    ],
)
def test_shrink_straight_stroke_keeps_its_centred_middle(ratio, first, last):
    out = shrink(horizontal(), ratio, seed=0)
    assert columns(out) == list(range(first, last + 1))
    kept = out != IGNORE
    assert kept.sum() == 3 * (last - first + 1)
    assert (out[kept] == 1).all()
    assert np.array_equal(np.nonzero(kept.any(1))[0], [9, 10, 11])


def test_shrink_one_keeps_one_pixel_per_stroke():
    s = horizontal()
    s[15:18, 50:58] = 0  # a background stroke
    out = shrink(s, 1.0, seed=0)
    assert np.argwhere(out == 1).tolist() == [[9, 25]]  # the middle column
    assert (out == 0).sum() == 1
    assert (out != IGNORE).sum() == 2


def test_shrink_zero_is_an_equal_copy():
    s = u_shape()
    out = shrink(s, 0.0, seed=0)
    assert out is not s and np.array_equal(out, s)


def test_shrink_follows_a_curved_stroke():
    s = l_shape()
    middle = np.argwhere(shrink(s, 1.0, 0) != IGNORE)
    assert len(middle) == 1
    (my, mx) = middle[0]
    assert 10 <= my <= 12 and 30 <= mx <= 35, "the geodesic middle of this L is at its corner"
    out = shrink(s, 0.5, 0)
    kept = out != IGNORE
    assert kept[my, mx]
    assert n_components(kept) == 1
    assert 0.4 < kept.sum() / (s != IGNORE).sum() < 0.6
    ys, xs = np.nonzero(kept)
    assert xs.min() < 30 and ys.max() > 16, "the kept part runs along both arms"
    assert kept[ys, xs].all() and (s[kept] == 2).all()


def test_shrink_u_shape_keeps_the_bottom_and_both_arms_equally():
    s = u_shape()
    assert np.argwhere(shrink(s, 1.0, 0) != IGNORE).tolist() == [[37, 17]]
    kept = shrink(s, 0.5, 0) != IGNORE
    assert kept[37:40, 8:27].all(), "the whole bottom bar is the middle of the stroke"
    left, right = kept[:37, 5:8].sum(), kept[:37, 27:30].sum()
    assert left > 0 and abs(int(left) - int(right)) <= 3
    assert n_components(kept) == 1


def test_shrink_handles_every_stroke_and_class_separately():
    s = horizontal(3)
    s[15:18, 5:26] = 0  # a background stroke, 21 px long
    s[1, 1] = 2  # a single-pixel stroke
    out = shrink(s, 0.5, 0)
    assert columns(np.where(out == 3, out, IGNORE)) == list(range(15, 36))
    assert columns(np.where(out == 0, out, IGNORE)) == list(range(10, 21)), "background strokes shrink too"
    assert out[1, 1] == 2
    assert set(np.unique(out)) == {0, 2, 3, IGNORE}


def test_shrink_does_not_modify_its_input_and_ignores_seed():
    s = l_shape()
    before = s.copy()
    a = shrink(s, 0.4, seed=0)
    assert np.array_equal(s, before)
    assert np.array_equal(a, shrink(s, 0.4, seed=99))


# ---- drop -------------------------------------------------------------------------------------------


def test_drop_zero_keeps_everything_and_one_keeps_only_background():
    s = dots([1, 2, 0, 1, 0, 2])
    assert np.array_equal(drop(s, 0.0, 3), s)
    out = drop(s, 1.0, 3)
    assert np.array_equal(out == 0, s == 0)
    assert set(np.unique(out)) == {0, IGNORE}


def test_drop_is_seeded_per_call_and_whole_strokes_go():
    classes = [1, 2] * 16
    s = dots(classes)
    s[36:39, 0:40] = 0  # a background stroke that must stay
    a, b = drop(s, 0.5, seed=11), drop(s, 0.5, seed=12)
    assert np.array_equal(a, drop(s, 0.5, seed=11))
    assert not np.array_equal(a, b)
    for out in (a, b):
        assert np.array_equal(out == 0, s == 0)
        kept = [(out[pts[:, 0], pts[:, 1]] == cls) for cls, pts in strokes(s) if cls]
        assert all(k.all() or not k.any() for k in kept), "a stroke is kept or dropped whole"
        assert 6 <= sum(k.all() for k in kept) <= 26


def test_drop_does_not_modify_its_input():
    s = dots([1, 2, 1])
    before = s.copy()
    drop(s, 1.0, 0)
    assert np.array_equal(s, before)


@pytest.mark.parametrize("fn", [shrink, drop])
@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(fn, ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn(horizontal(), ratio, 0)


def test_strokes_are_components_of_one_class():
    s = np.full((10, 10), IGNORE, np.uint8)
    s[0, 0:3] = 1
    s[1, 3] = 1  # diagonal neighbour: the same 8-connected stroke
    s[0, 4:6] = 2  # touches class 1 but is another stroke
    s[5, 5] = 1
    got = [(cls, len(pts)) for cls, pts in strokes(s)]
    assert got == [(1, 4), (1, 1), (2, 2)]


# ---- seeds, names, folders ----------------------------------------------------------------------------


def test_image_seed_is_stable():
    assert image_seed("train_00000", 0) == zlib.crc32(b"train_00000") == 4191405373
    assert image_seed("train_00000", 1) == 1743043724
    assert image_seed("2007_000032", 3) == 2430024024
    assert image_seed("a", 0) != image_seed("b", 0)
    assert 0 <= image_seed("x" * 100, 10**9) < 2**32


def test_variant_name_encodes_ratios_and_seed():
    assert variant_name("pascal_2012_scribble", 0.3, 0.5, 7) == "pascal_2012_scribble@drop0.5@shrink0.3-seed7"
    assert variant_name("a/b", 0.25, 0.0, 0) == "b@shrink0.25-seed0"
    assert variant_name("s", 0.0, 1.0, 2) == "s@drop1-seed2"


@pytest.fixture
def synth(tiny_synth, tmp_path):
    """A private copy of the tiny dataset (variants are written under the root)."""
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    return root


def test_make_variant_writes_and_reuses_a_folder(synth, monkeypatch):
    data = DataSpec(root=str(synth), num_classes=3)
    folder = make_variant(data, shrink_ratio=0.5, drop_ratio=0.5, seed=7)
    assert folder == synth / "pascal_2012_scribble@drop0.5@shrink0.5-seed7"
    train_ids = (synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(f"{i}.png" for i in train_ids)
    assert (folder / ".complete").is_file()
    assert not list(synth.glob(".variant-*")), "no temporary folder is left behind"
    for sample_id in train_ids:
        base = read_label(synth / "pascal_2012_scribble" / f"{sample_id}.png", 3)
        want = shrink(drop(base, 0.5, image_seed(sample_id, 7)), 0.5, 0)
        assert np.array_equal(read_label(folder / f"{sample_id}.png", 3), want), sample_id
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("a cached variant must not be recomputed")

    monkeypatch.setattr(scribbles, "shrink", boom)
    monkeypatch.setattr(scribbles, "drop", boom)
    assert make_variant(data, shrink_ratio=0.5, drop_ratio=0.5, seed=7) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_make_variant_differs_per_seed_and_replaces_a_half_written_folder(synth):
    data = DataSpec(root=str(synth), num_classes=3)
    stale = synth / variant_name("pascal_2012_scribble", 0.0, 1.0, 1)
    stale.mkdir()
    (stale / "junk.png").write_bytes(b"half")
    folder = make_variant(data, 0.0, 1.0, 1)
    assert folder == stale and (folder / ".complete").is_file() and not (folder / "junk.png").exists()
    for png in folder.glob("*.png"):
        assert set(np.unique(read_label(png, 3))) <= {0, IGNORE}  # drop 1: background strokes only
    a = make_variant(data, 0.0, 0.5, 1)
    b = make_variant(data, 0.0, 0.5, 2)
    assert a != b
    assert any(not np.array_equal(read_label(p, 3), read_label(b / p.name, 3)) for p in sorted(a.glob("*.png"))), (
        "drop variants of two seeds should differ"
    )


def test_scribble_folder(synth):
    base = DataSpec(root=str(synth), num_classes=3)
    assert scribble_folder(base) == synth / "pascal_2012_scribble"
    assert not list(synth.glob("pascal_2012_scribble@*")), "no variant is written for ratio 0"
    shrunk = DataSpec(root=str(synth), num_classes=3, shrink_ratio=0.25, variant_seed=4)
    folder = scribble_folder(shrunk)
    assert folder.name == "pascal_2012_scribble@shrink0.25-seed4" and (folder / ".complete").is_file()


def test_a_cached_variant_of_other_scribbles_or_another_training_list_gets_a_folder_of_its_own(synth):
    """The variant's folder is named by the source folder's last part and the recipe; its .complete
    records the source and the training ids. A later run on a longer list (its new ids were missing)
    or on another folder of the same name gets a variant of its own scribbles, in a folder named with
    a digest of what it is made of: a complete variant is never replaced (others may be reading it)."""
    train = synth / "ImageSets/SegmentationAug/train.txt"
    ids = train.read_text().split()
    train.write_text("\n".join(ids[:2]) + "\n")
    data = DataSpec(root=str(synth), num_classes=3)
    short = make_variant(data, 0.5, 0.0, 0)
    assert short.name == "pascal_2012_scribble@shrink0.5-seed0"
    assert sorted(p.stem for p in short.glob("*.png")) == sorted(ids[:2])
    train.write_text("\n".join(ids) + "\n")
    longer = make_variant(data, 0.5, 0.0, 0)
    assert longer.name.startswith("pascal_2012_scribble@shrink0.5-seed0-") and longer != short
    assert sorted(p.stem for p in longer.glob("*.png")) == sorted(ids)  # every id
    assert sorted(p.stem for p in short.glob("*.png")) == sorted(ids[:2])  # the first one untouched
    assert make_variant(data, 0.5, 0.0, 0) == longer  # and found again
    other = synth / "other" / "pascal_2012_scribble"
    shutil.copytree(synth / "pascal_2012_scribble", other)
    for png in other.glob("*.png"):  # other scribbles: every stroke dropped
        write_label(png, np.full_like(read_label(png, 3), IGNORE))
    data_other = DataSpec(root=str(synth), num_classes=3, scribble_dir="other/pascal_2012_scribble")
    own = make_variant(data_other, 0.5, 0.0, 0)
    assert own not in (short, longer) and all((read_label(p, 3) == IGNORE).all() for p in own.glob("*.png"))
    assert "source=other/pascal_2012_scribble" in (own / ".complete").read_text()
