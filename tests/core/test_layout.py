"""Dataset layout: paths from a DataSpec, split lists, and the cheap check the API runs before queueing."""

from __future__ import annotations

import shutil

import pytest

from cdsp_core.data.layout import VOC_CLASSES, DatasetError, Layout, check_layout, read_ids, require_layout
from cdsp_core.spec import DataSpec


@pytest.fixture
def synth(tiny_synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    return root


def test_voc_classes():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[12] == "dog"


def test_layout_from_spec(tmp_path):
    lay = Layout.from_spec(DataSpec(root=str(tmp_path), pseudo_label_dir="pl", num_classes=4))
    assert lay.image("a") == tmp_path / "JPEGImages/a.jpg"
    assert lay.scribble("a") == tmp_path / "pascal_2012_scribble/a.png"
    assert lay.gt("a") == tmp_path / "SegmentationClassAug/a.png"
    assert lay.pseudo("a") == tmp_path / "pl/a.png"
    assert lay.train_list == tmp_path / "ImageSets/SegmentationAug/train.txt"
    assert lay.num_classes == 4
    absolute = Layout.from_spec(DataSpec(root=str(tmp_path), pseudo_label_dir="/elsewhere/pl"))
    assert str(absolute.pseudo("a")) == "/elsewhere/pl/a.png"
    with pytest.raises(DatasetError, match="pseudo_label_dir"):
        Layout.from_spec(DataSpec(root=str(tmp_path))).pseudo("a")


def test_read_ids(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a\n\n  b  \n2007_000032 1\n")
    assert read_ids(path) == ["a", "b", "2007_000032"]
    with pytest.raises(DatasetError, match=r"list\.txt: split list is missing"):
        read_ids(tmp_path / "nope" / "list.txt")
    path.write_text("\n \n")
    with pytest.raises(DatasetError, match=r"list\.txt: split list is empty"):
        read_ids(path)
    path.write_text("a\nb\na\nc\nb\n")
    with pytest.raises(DatasetError, match=r"list\.txt: duplicate ids \['a', 'b'\]"):
        read_ids(path)


def test_generated_set_is_fine(tiny_synth):
    assert check_layout(DataSpec(root=str(tiny_synth), num_classes=3)) == []


def test_missing_root(tmp_path):
    problems = check_layout(DataSpec(root=str(tmp_path / "nope")))
    assert len(problems) == 1 and problems[0].field == "data.root" and "nope" in problems[0].message


@pytest.mark.parametrize(
    ("folder", "field"),
    [
        ("JPEGImages", "data.image_dir"),
        ("pascal_2012_scribble", "data.scribble_dir"),
        ("SegmentationClassAug", "data.gt_dir"),
    ],
)
def test_missing_folder_is_named(synth, folder, field):
    shutil.rmtree(synth / folder)
    problems = check_layout(DataSpec(root=str(synth), num_classes=3))
    assert len(problems) == 1
    assert problems[0].field == field and folder in problems[0].message and "missing" in problems[0].message
    assert str(problems[0]).startswith(f"{field}: ")


def test_missing_list_and_files_are_named(synth):
    (synth / "ImageSets/SegmentationAug/val.txt").unlink()
    (synth / "pascal_2012_scribble/train_00001.png").unlink()
    problems = check_layout(DataSpec(root=str(synth), num_classes=3))
    assert len(problems) == 2
    assert any(p.field == "data.val_list" and "val.txt" in p.message and "missing" in p.message for p in problems)
    assert any(p.field == "data.train_list" and "train_00001.png" in p.message for p in problems)


def test_missing_val_ground_truth_and_pseudo_folder(synth):
    (synth / "SegmentationClassAug/val_00000.png").unlink()
    data = DataSpec(root=str(synth), num_classes=3, pseudo_label_dir="pl")
    problems = check_layout(data, need_pseudo=True)
    assert any(p.field == "data.val_list" and "val_00000.png" in p.message for p in problems)
    assert any(p.field == "data.pseudo_label_dir" and "pl" in p.message for p in problems)
    assert not any("pseudo" in p.field for p in check_layout(data))  # not asked for


def test_renamed_folders_follow_the_spec(synth):
    (synth / "pascal_2012_scribble").rename(synth / "scribbles")
    assert check_layout(DataSpec(root=str(synth), num_classes=3))
    assert check_layout(DataSpec(root=str(synth), num_classes=3, scribble_dir="scribbles")) == []


def test_require_layout_names_every_problem_and_checks_a_good_dataset_once(synth):
    data = DataSpec(root=str(synth), num_classes=3)
    require_layout(data)
    shutil.rmtree(synth / "JPEGImages")
    require_layout(data)  # it passed in this process: not checked again (every worker and stage asks)
    broken = DataSpec(root=str(synth), num_classes=3, gt_dir="nope")
    with pytest.raises(DatasetError, match=r"data\.image_dir: folder .*JPEGImages is missing; data\.gt_dir: folder"):
        require_layout(broken)


@pytest.mark.parametrize("orientation", [3, 6])
def test_an_image_is_read_in_its_own_pixel_grid_whatever_its_exif_orientation(tmp_path, orientation):
    """Label PNGs carry no orientation: a JPEG tagged "rotate 180" (3) or "rotate 90" (6) is read as
    stored, so it stays on its labels' pixels (it came back turned, or with its sides swapped)."""
    import numpy as np
    from PIL import Image

    from cdsp_core.data.files import read_image

    raw = np.zeros((40, 60, 3), np.uint8)
    raw[:, :30] = 255  # the left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == (40, 60, 3)
    assert image[:, :30].mean() > 250 and image[:, 30:].mean() < 5
