"""Datasets of both stages on the tiny synthetic set: contents, joint augmentation, distance maps, errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cdsp_core.data.dataset import ClassificationDataset, TrainDataset, WholeImageDataset, collate, image_labels
from cdsp_core.data.distance_maps import DistanceMapCache, write_distance_maps
from cdsp_core.data.layout import DatasetError
from cdsp_core.data.transforms import MEAN_RGB, denormalize, normalize
from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
from cdsp_core.spec import DataSpec

K, SIZE = 3, 64
LAMBDA_S, LAMBDA_C = 1.0, 6.0
GT = "SegmentationClassAug"


def spec(root: Path, **kw) -> DataSpec:
    """The tiny set with the ground truth standing in for pseudo-labels: no 255 in it, so after a
    transform pseudo == 255 marks exactly the pixels the augmentation invented."""
    return DataSpec(root=str(root), num_classes=K, pseudo_label_dir=GT, **{"crop_size": SIZE} | kw)


def full(root: Path, **kw) -> TrainDataset:
    return TrainDataset(
        spec(root, **kw), with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=LAMBDA_S, lambda_c=LAMBDA_C
    )


def read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture
def synth(tiny_synth, tmp_path):
    """A private copy of the tiny dataset, for tests that break files."""
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    return root


# ---- contents -------------------------------------------------------------------------------------


def test_sample_keys_dtypes_shapes(tiny_synth):
    torch.manual_seed(0)
    ds = full(tiny_synth, crop_size=48)
    assert len(ds) == 8 and ds.ids[0] == "train_00000"
    sample = ds[0]
    assert set(sample) == {"id", "image", "scribble", "pseudo", "dist_s", "dist_c"}
    assert sample["id"] == "train_00000"
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 48, 48)
    for key in ("scribble", "pseudo"):
        assert sample[key].dtype == torch.int64 and sample[key].shape == (48, 48)
    for key in ("dist_s", "dist_c"):
        assert sample[key].dtype == torch.uint8 and sample[key].shape == (48, 48)
    minimal = TrainDataset(spec(tiny_synth), augment=False)[1]
    assert set(minimal) == {"id", "image", "scribble"}


def test_unaugmented_sample_is_the_file_placed_in_the_padding(tiny_synth):
    torch.manual_seed(0)
    crop = 80
    ds = full(tiny_synth, crop_size=crop, augment=False)
    for index in (0, 3):
        sample = ds[index]
        sid = ds.ids[index]
        scribble = read(tiny_synth / "pascal_2012_scribble" / f"{sid}.png").astype(np.int64)
        got = sample["scribble"].numpy()
        offsets = [
            (y, x)
            for y in range(crop - SIZE + 1)
            for x in range(crop - SIZE + 1)
            if np.array_equal(got[y : y + SIZE, x : x + SIZE], scribble)
        ]
        valid = np.zeros((crop, crop), bool)
        matches = []
        for y, x in offsets:
            valid[:] = False
            valid[y : y + SIZE, x : x + SIZE] = True
            if (got[~valid] == 255).all():
                matches.append((y, x))
        assert len(matches) >= 1, "the scribble file must appear unchanged, surrounded by 255"
        y, x = matches[0]
        valid[:] = False
        valid[y : y + SIZE, x : x + SIZE] = True
        gt = read(tiny_synth / GT / f"{sid}.png")
        assert np.array_equal(sample["pseudo"].numpy()[valid].reshape(SIZE, SIZE), gt)
        assert (sample["pseudo"].numpy()[~valid] == 255).all()
        image = torch.from_numpy(read_rgb(tiny_synth / "JPEGImages" / f"{sid}.jpg")).permute(2, 0, 1)
        assert torch.equal(sample["image"][:, y : y + SIZE, x : x + SIZE], normalize(image))
        assert torch.equal(denormalize(sample["image"])[:, ~torch.from_numpy(valid)].unique(dim=1).flatten(),
                           torch.tensor(MEAN_RGB, dtype=torch.uint8))  # fmt: skip
        for key in ("dist_s", "dist_c"):
            assert (sample[key].numpy()[~valid] == 0).all(), f"{key}: padding carries no supervision"
        d_s = scribble_distance_map(scribble.astype(np.uint8), LAMBDA_S, K)
        assert np.array_equal(sample["dist_s"].numpy()[y : y + SIZE, x : x + SIZE], d_s)


def test_distance_maps_are_exact_for_the_augmented_labels(tiny_synth):
    """Within the real pixels the maps equal Eq. 14/16 recomputed from the returned labels (d_c as of a
    crop: no contour along its cut edges); 0 elsewhere."""
    ds = full(tiny_synth, crop_size=56, augment=True)
    invented = 0
    for seed in range(6):
        torch.manual_seed(seed)
        sample = ds[seed % len(ds)]
        scribble = sample["scribble"].numpy().astype(np.uint8)
        pseudo = sample["pseudo"].numpy().astype(np.uint8)
        valid = pseudo != 255  # the ground truth has no 255: only invented pixels carry it
        invented += int((~valid).sum())
        d_s = np.where(valid, scribble_distance_map(scribble, LAMBDA_S, K), 0)
        d_c = np.where(valid, pseudo_boundary_distance_map(pseudo, LAMBDA_C, K, cut=True), 0)
        assert np.array_equal(sample["dist_s"].numpy(), d_s)
        assert np.array_equal(sample["dist_c"].numpy(), d_c)
        assert (scribble[~valid] == 255).all()
    assert invented > 0, "some seed should scale down or rotate"


def test_augmentation_keeps_labels_aligned_and_valid(tiny_synth):
    ds = full(tiny_synth, crop_size=56, augment=True)
    checked = 0
    for seed in range(8):
        torch.manual_seed(100 + seed)
        sample = ds[seed]
        scribble, pseudo = sample["scribble"].numpy(), sample["pseudo"].numpy()
        assert set(np.unique(scribble)) <= {0, 1, 2, 255}
        assert set(np.unique(pseudo)) <= {0, 1, 2, 255}
        marked = scribble != 255
        # Scribbles lie on their ground-truth class, so the two were transformed identically.
        assert np.array_equal(scribble[marked], pseudo[marked])
        checked += int(marked.sum())
    assert checked > 500


def test_augmentation_keeps_the_image_aligned_with_its_labels(tmp_path):
    """Images painted by class: deep inside each region the augmented colour is that class's colour."""
    colours = np.array([(20, 20, 200), (230, 40, 40), (40, 220, 40)], np.uint8)
    root = tmp_path / "blocks"
    for folder in ("JPEGImages", "pascal_2012_scribble", GT, "ImageSets/SegmentationAug"):
        (root / folder).mkdir(parents=True)
    ids = ["a", "b"]
    for i, sid in enumerate(ids):
        label = np.zeros((SIZE, SIZE), np.uint8)
        label[:, : 24 + 8 * i] = 1
        label[30:58, 36 - 10 * i : 60] = 2
        cv2.imwrite(str(root / "JPEGImages" / f"{sid}.jpg"), cv2.cvtColor(colours[label], cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "pascal_2012_scribble" / f"{sid}.png"), label)
        cv2.imwrite(str(root / GT / f"{sid}.png"), label)
    (root / "ImageSets/SegmentationAug/train.txt").write_text("\n".join(ids) + "\n")
    ds = full(root, crop_size=48, augment=True)
    deep_pixels = 0
    for seed in range(10):
        torch.manual_seed(seed)
        sample = ds[seed % 2]
        image = denormalize(sample["image"]).permute(1, 2, 0).numpy().astype(int)
        label = sample["scribble"].numpy().astype(np.uint8)
        for cls in range(K):
            deep = cv2.erode((label == cls).astype(np.uint8), np.ones((7, 7), np.uint8), borderValue=0) > 0
            if deep.any():
                err = np.abs(image[deep] - colours[cls].astype(int)).max(1)
                assert (err < 50).mean() > 0.99, f"seed {seed}: class {cls} pixels have another colour"
                deep_pixels += int(deep.sum())
    assert deep_pixels > 5000


def test_classification_and_whole_image_datasets(tiny_synth):
    torch.manual_seed(0)
    cls_ds = ClassificationDataset(spec(tiny_synth, crop_size=40))
    sample = cls_ds[2]
    assert set(sample) == {"id", "image", "scribble", "labels", "known", "present"}
    assert sample["image"].shape == (3, 40, 40) and sample["labels"].dtype == torch.float32
    assert sample["scribble"].shape == (40, 40)  # the crop's scribble, for the dense maps
    scribble = read(tiny_synth / "pascal_2012_scribble" / f"{cls_ds.ids[2]}.png")
    assert np.array_equal(sample["labels"].numpy(), image_labels(scribble, K))
    assert (sample["known"] == 1).all()  # image-level labels: every entry known
    # The classes the dense maps may choose from: background, then the whole image's classes.
    assert sample["present"].tolist() == [True, *(image_labels(scribble, K) > 0).tolist()]

    data = spec(tiny_synth)
    val = WholeImageDataset(data, "val", {"gt": tiny_synth / GT, "scribble": None})
    assert len(val) == 4 and val.ids[0] == "val_00000"
    sample = val[1]
    assert set(sample) == {"id", "image", "gt"}
    assert sample["image"].shape == (3, SIZE, SIZE) and sample["gt"].dtype == torch.int64
    assert np.array_equal(sample["gt"].numpy(), read(tiny_synth / GT / "val_00001.png"))
    image = torch.from_numpy(read_rgb(tiny_synth / "JPEGImages/val_00001.jpg")).permute(2, 0, 1)
    assert torch.equal(sample["image"], normalize(image))
    train = WholeImageDataset(data, "train", {"scribble": tiny_synth / "pascal_2012_scribble"}, ids=["train_00004"])
    assert len(train) == 1 and set(train[0]) == {"id", "image", "scribble"}
    with pytest.raises(ValueError, match="'test'"):
        WholeImageDataset(data, "test", {})


# ---- image labels and collate ---------------------------------------------------------------------


def test_image_labels_golden():
    s = np.array([[0, 2, 255], [2, 0, 255]], np.uint8)
    assert image_labels(s, 3).tolist() == [0.0, 1.0]
    assert image_labels(s, 3).dtype == np.float32
    voc = np.array([[0, 1, 20], [255, 15, 1]], np.uint8)
    want = np.zeros(20, np.float32)
    want[[0, 14, 19]] = 1
    assert np.array_equal(image_labels(voc, 21), want)
    assert image_labels(np.full((2, 2), 255, np.uint8), 21).sum() == 0
    assert image_labels(np.zeros((2, 2), np.uint8), 21).sum() == 0  # background scribbles only


def test_collate_stacks_and_refuses_different_sizes(tiny_synth):
    torch.manual_seed(0)
    ds = full(tiny_synth, crop_size=32)
    batch = collate([ds[0], ds[1]])
    assert batch["id"] == ["train_00000", "train_00001"]
    assert batch["image"].shape == (2, 3, 32, 32) and batch["dist_c"].shape == (2, 32, 32)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=0)
    first = next(iter(loader))
    assert first["scribble"].shape == (4, 32, 32) and len(first["id"]) == 4
    a = {"id": "a", "image": torch.zeros(3, 4, 4)}
    b = {"id": "b", "image": torch.zeros(3, 5, 4)}
    with pytest.raises(DatasetError) as info:
        collate([a, b])
    msg = str(info.value)
    assert "'image'" in msg and "(3, 4, 4)" in msg and "(3, 5, 4)" in msg and "batch size 1" in msg
    assert "'a'" in msg and "'b'" in msg


# ---- errors ---------------------------------------------------------------------------------------


def says(path: Path, problem: str) -> str:
    """A pattern for an error message that names the file, then the problem."""
    return re.escape(f"{path}: {problem}")


def first_sample(root: Path, **kw):
    return full(root, augment=False, **kw)[0]


def test_missing_image(synth):
    path = synth / "JPEGImages/train_00000.jpg"
    path.unlink()
    with pytest.raises(DatasetError, match=says(path, "image is missing")):
        first_sample(synth)


def test_missing_scribble(synth):
    path = synth / "pascal_2012_scribble/train_00000.png"
    path.unlink()
    with pytest.raises(DatasetError, match=says(path, "scribble is missing")):
        first_sample(synth)


def test_missing_pseudo_label(synth):
    path = synth / GT / "train_00000.png"
    path.unlink()
    with pytest.raises(DatasetError, match=says(path, "pseudo-label is missing")):
        first_sample(synth)


def test_corrupt_files(synth):
    png = synth / "pascal_2012_scribble/train_00000.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    with pytest.raises(DatasetError, match=says(png, "cannot decode scribble")):
        first_sample(synth)
    jpg = synth / "JPEGImages/train_00000.jpg"
    jpg.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=says(jpg, "cannot decode image")):
        first_sample(synth)


def test_label_of_the_wrong_size(synth):
    path = synth / "pascal_2012_scribble/train_00000.png"
    cv2.imwrite(str(path), np.full((SIZE, SIZE + 1), 255, np.uint8))
    with pytest.raises(DatasetError, match=says(path, "scribble size 65x64 does not match the image's 64x64")):
        first_sample(synth)


def test_label_value_outside_the_classes(synth):
    path = synth / GT / "train_00000.png"
    label = read(path)
    label[5, 5] = 7
    cv2.imwrite(str(path), label)
    with pytest.raises(DatasetError, match=says(path, "pseudo-label has values [7] outside 0..2 and 255")):
        first_sample(synth)


def test_colour_label_png(synth):
    path = synth / "pascal_2012_scribble/train_00000.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    with pytest.raises(DatasetError, match=says(path, "scribble must be a single-channel PNG, got mode RGB")):
        first_sample(synth)


def test_palette_png_gives_its_indices(synth):
    path = synth / "pascal_2012_scribble/train_00000.png"
    label = read(path)
    im = Image.fromarray(label, mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    im.save(path)
    sample = full(synth, augment=False)[0]
    assert np.array_equal(sample["scribble"].numpy(), label)


def test_split_list_errors(synth):
    lst = synth / "ImageSets/SegmentationAug/train.txt"
    lst.write_text("train_00000\ntrain_00001\ntrain_00000\n")
    with pytest.raises(DatasetError, match=says(lst, "duplicate ids ['train_00000']")):
        full(synth)
    lst.unlink()
    with pytest.raises(DatasetError, match=says(lst, "split list is missing")):
        full(synth)
    with pytest.raises(DatasetError, match="split list is missing"):
        ClassificationDataset(spec(synth))


def test_constructor_refuses_inconsistent_options(tiny_synth):
    with pytest.raises(DatasetError, match="pseudo_label_dir"):
        TrainDataset(DataSpec(root=str(tiny_synth), num_classes=K), with_pseudo=True)
    with pytest.raises(DatasetError, match="needs the pseudo-label"):
        TrainDataset(spec(tiny_synth), with_dist_c=True)


# ---- distance-map cache -------------------------------------------------------------------------------


def test_distance_map_cache_is_used_and_checked(tiny_synth, tmp_path):
    cache = tmp_path / "dm"
    folder, n, _ = write_distance_maps(spec(tiny_synth), cache, LAMBDA_S, LAMBDA_C)
    assert folder == cache and n == 8
    assert sorted(p.name for p in (cache / "scribble").iterdir()) == [f"train_{i:05d}.png" for i in range(8)]
    scribble = read(tiny_synth / "pascal_2012_scribble/train_00002.png")
    gt = read(tiny_synth / GT / "train_00002.png")
    assert np.array_equal(read(cache / "scribble/train_00002.png"), scribble_distance_map(scribble, LAMBDA_S, K))
    assert np.array_equal(read(cache / "pseudo/train_00002.png"), pseudo_boundary_distance_map(gt, LAMBDA_C, K))

    data = spec(tiny_synth, distance_map_dir=str(cache), augment=False)
    ds = TrainDataset(data, with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=LAMBDA_S, lambda_c=LAMBDA_C)
    assert ds.cache is not None
    sample = ds[2]
    assert np.array_equal(sample["dist_s"].numpy(), read(cache / "scribble/train_00002.png"))
    # Proof that the cache, not a recomputation, is read: a doctored map comes back as is.
    cv2.imwrite(str(cache / "scribble/train_00002.png"), np.full((SIZE, SIZE), 77, np.uint8))
    assert (ds[2]["dist_s"] == 77).all()
    # With augmentation, cached maps are resampled with the labels and still zero in the padding.
    aug = TrainDataset(
        spec(tiny_synth, distance_map_dir=str(cache), crop_size=72),
        with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=LAMBDA_S, lambda_c=LAMBDA_C,
    )  # fmt: skip
    padded = 0
    for seed in range(4):
        torch.manual_seed(seed)
        sample = aug[0]
        padding = sample["pseudo"] == 255
        padded += int(padding.sum())
        assert (sample["dist_s"][padding] == 0).all() and (sample["dist_c"][padding] == 0).all()
        assert (sample["dist_c"][~padding] > 0).any()
    assert padded > 0

    with pytest.raises(DatasetError, match=r"dm: cache was made with lambda_s=1\.0, the spec asks for 2\.0"):
        TrainDataset(data, with_dist_s=True, lambda_s=2.0, lambda_c=LAMBDA_C)
    with pytest.raises(DatasetError, match=r"lambda_c=6\.0"):
        TrainDataset(data, with_pseudo=True, with_dist_c=True, lambda_s=LAMBDA_S, lambda_c=7.0)
    with pytest.raises(DatasetError, match="num_classes=3"):
        DistanceMapCache(cache, LAMBDA_S, LAMBDA_C, 21)


def test_a_cache_made_from_other_labels_than_the_run_reads_is_refused(tiny_synth, tmp_path):
    """The cache records the scribbles and pseudo-labels its maps come from: a shrink/drop variant of
    the scribbles, or stage 1's own pseudo-labels, would otherwise be weighted by maps of strokes and
    boundaries they do not have."""
    import json
    import shutil

    data = spec(tiny_synth, distance_map_dir=str(tmp_path / "dm"), augment=False)
    write_distance_maps(spec(tiny_synth), tmp_path / "dm", LAMBDA_S, LAMBDA_C)
    meta = json.loads((tmp_path / "dm" / "meta.json").read_text())
    assert meta["scribble_dir"] == "pascal_2012_scribble"  # relative to the root: the same on every mount
    kwargs = {"with_pseudo": True, "with_dist_s": True, "with_dist_c": True, "lambda_s": LAMBDA_S, "lambda_c": LAMBDA_C}
    assert TrainDataset(data, **kwargs).cache is not None  # the same labels: taken
    variant = tmp_path / "variant"
    shutil.copytree(tiny_synth / "pascal_2012_scribble", variant)
    made_elsewhere = r"made from the scribbles in .*pascal_2012_scribble, this run reads .*variant"
    with pytest.raises(DatasetError, match=made_elsewhere):
        TrainDataset(data, scribble_dir=variant, **kwargs)
    other = data.model_copy(update={"pseudo_label_dir": str(variant)})
    with pytest.raises(DatasetError, match=r"made from the pseudo-labels in .*SegmentationClassAug"):
        TrainDataset(other, **kwargs)
    # d_s alone does not care where the pseudo-labels come from
    assert TrainDataset(other, with_dist_s=True, lambda_s=LAMBDA_S, lambda_c=LAMBDA_C).cache is not None


def test_cache_without_pseudo_maps_and_without_meta(tiny_synth, tmp_path):
    plain = DataSpec(root=str(tiny_synth), num_classes=K)
    write_distance_maps(plain, tmp_path / "dm", LAMBDA_S, LAMBDA_C)
    assert not (tmp_path / "dm" / "pseudo").exists()
    data = spec(tiny_synth, distance_map_dir=str(tmp_path / "dm"), augment=False)
    ds = TrainDataset(data, with_pseudo=True, with_dist_s=True, with_dist_c=True, lambda_s=LAMBDA_S, lambda_c=LAMBDA_C)
    with pytest.raises(DatasetError, match="no pseudo-label maps"):
        ds[0]
    (tmp_path / "dm" / "meta.json").unlink()
    with pytest.raises(DatasetError, match=r"meta\.json"):
        TrainDataset(data, with_dist_s=True)
    # Without distance maps asked for, the cache setting is ignored.
    assert TrainDataset(data).cache is None


def test_crop_labels_name_what_the_crop_keeps_and_mask_the_unknown(tiny_synth):
    """With crop labels, a class is present if its scribble survives the crop, absent if the image has
    none, and unknown (masked) if the image has it but the crop lost its scribble."""
    torch.manual_seed(0)
    ds = ClassificationDataset(spec(tiny_synth, crop_size=16), crop_labels=True)
    lost = 0
    for i in range(len(ds)):
        for _ in range(4):
            sample = ds[i]
            whole = image_labels(read(tiny_synth / "pascal_2012_scribble" / f"{ds.ids[i]}.png"), K)
            labels, known = sample["labels"].numpy(), sample["known"].numpy()
            assert (labels <= whole).all()  # a crop cannot hold a class the image lacks
            assert (known[whole == 0] == 1).all()  # absent from the image: known absent
            assert (known[labels == 1] == 1).all()  # scribble in the crop: known present
            unknown = (whole == 1) & (labels == 0)
            assert (known[unknown] == 0).all()
            lost += int(unknown.sum())
    assert lost > 0  # 16 px crops of 64 px images do lose scribbles: the masking is exercised
