"""`cdsp data synth|variants|distance-maps|scribblesup-xml|trivial`: files written, messages and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cdsp_core import cli
from cdsp_core.data.synthetic import generate
from cdsp_core.distance import pseudo_boundary_distance_map, scribble_distance_map
from service.cli import app

CDSP = Path(sys.executable).with_name("cdsp")


@pytest.fixture
def invoke(monkeypatch):
    """Run `cdsp ...` in process; wide consoles so that paths in messages are not wrapped."""
    for console in (cli.console, cli.err):
        monkeypatch.setattr(console, "_width", 1000)

    def run(*args: str):
        return CliRunner().invoke(app, [str(a) for a in args])

    return run


@pytest.fixture
def synth(tiny_synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    return root


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_the_data_commands(invoke):
    result = invoke("data", "--help")
    assert result.exit_code == 0
    for name in ("synth", "variants", "distance-maps", "scribblesup-xml", "degrade", "trivial"):
        assert name in result.output


def test_synth_console_script(tmp_path):
    """The installed `cdsp` (two render processes by default) writes the same files as generate()."""
    root = tmp_path / "synth"
    env = os.environ | {"COLUMNS": "300"}
    args = ["data", "synth", "--root", root, "--train", "6", "--val", "2", "--size", "48", "--classes", "3"]
    proc = subprocess.run([CDSP, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 train + 2 val images of 48 px" in one_line(proc.stdout)
    assert (root / "preview.png").is_file()
    preview = cv2.imread(str(root / "preview.png"))
    assert preview is not None and preview.shape[1] > preview.shape[0] > 100
    assert (root / "ImageSets/SegmentationAug/train.txt").read_text().split() == [f"train_{i:05d}" for i in range(6)]
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 8
    meta = json.loads((root / "meta.json").read_text())
    assert (meta["num_train"], meta["num_val"], meta["size"], meta["num_classes"]) == (6, 2, 48, 3)
    generate(tmp_path / "ref", num_train=6, num_val=2, size=48, num_classes=3, seed=0)
    for folder in ("SegmentationClassAug", "pascal_2012_scribble", "JPEGImages"):
        for path in sorted((tmp_path / "ref" / folder).iterdir()):
            assert path.read_bytes() == (root / folder / path.name).read_bytes(), path.name


def test_synth_in_process_and_argument_errors(invoke, tmp_path):
    root = tmp_path / "s"
    result = invoke("data", "synth", "--root", root, "--train", "2", "--val", "1", "--size", "32",
                    "--classes", "2", "--workers", "1", "--no-preview")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (root / "preview.png").exists()
    assert (root / "SegmentationClassAug/val_00000.png").is_file()
    result = invoke("data", "synth", "--root", tmp_path / "t", "--size", "16", "--no-preview")
    assert result.exit_code == 2
    assert "error:" in result.output and "at least 32" in result.output
    assert not (tmp_path / "t").exists()


def test_variants(invoke, synth):
    result = invoke("data", "variants", "--root", synth, "--num-classes", "3")
    assert result.exit_code == 2
    assert "give --shrink and/or --drop (both are 0)" in result.output
    result = invoke("data", "variants", "--root", synth, "--num-classes", "3", "--shrink", "0.5", "--drop", "0.25",
                    "--seed", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = synth / "pascal_2012_scribble@drop0.25@shrink0.5-seed3"
    assert f"variant: {folder}" in one_line(result.output)
    assert (folder / ".complete").is_file() and len(list(folder.glob("*.png"))) == 8
    result = invoke("data", "variants", "--root", synth, "--num-classes", "3", "--shrink", "1.5")
    assert result.exit_code == 2 and "ratio must lie in [0, 1], got 1.5" in one_line(result.output)
    result = invoke("data", "variants", "--root", synth / "nope", "--num-classes", "3", "--drop", "0.5")
    assert result.exit_code == 2 and "split list is missing" in one_line(result.output)


def test_distance_maps(invoke, synth):
    result = invoke("data", "distance-maps", "--root", synth, "--num-classes", "3", "--lambda-s", "2",
                    "--lambda-c", "5", "--pseudo-dir", "SegmentationClassAug")  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = synth / "distance_maps"
    assert "wrote 8 images' distance maps" in one_line(result.output) and str(folder) in one_line(result.output)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == {"lambda_s": 2.0, "lambda_c": 5.0, "num_classes": 3, "pseudo": True,  # and the sources:
                    "scribble_dir": "pascal_2012_scribble", "pseudo_label_dir": "SegmentationClassAug"}  # fmt: skip
    assert len(list((folder / "scribble").glob("*.png"))) == len(list((folder / "pseudo").glob("*.png"))) == 8
    scribble = cv2.imread(str(synth / "pascal_2012_scribble/train_00005.png"), cv2.IMREAD_UNCHANGED)
    gt = cv2.imread(str(synth / "SegmentationClassAug/train_00005.png"), cv2.IMREAD_UNCHANGED)
    d_s = cv2.imread(str(folder / "scribble/train_00005.png"), cv2.IMREAD_UNCHANGED)
    d_c = cv2.imread(str(folder / "pseudo/train_00005.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(d_s, scribble_distance_map(scribble, 2.0, 3))
    assert np.array_equal(d_c, pseudo_boundary_distance_map(gt, 5.0, 3))

    out = synth.parent / "elsewhere"
    result = invoke("data", "distance-maps", "--root", synth, "--num-classes", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "meta.json").is_file() and not (out / "pseudo").exists()
    assert json.loads((out / "meta.json").read_text())["pseudo"] is False

    result = invoke("data", "distance-maps", "--root", synth, "--num-classes", "2")
    assert result.exit_code == 2 and "outside 0..1 and 255" in one_line(result.output)


def test_scribblesup_xml(invoke, tmp_path):
    xml_dir = tmp_path / "xml"
    xml_dir.mkdir()
    (xml_dir / "2007_000032.xml").write_text(
        "<annotation><filename>2007_000032.jpg</filename><size><width>40</width><height>30</height></size>"
        "<polygon><tag>background</tag><point><X>2</X><Y>2</Y></point><point><X>37</X><Y>2</Y></point></polygon>"
        "<polygon><tag>dog</tag><point><X>5</X><Y>15</Y></point><point><X>30</X><Y>15</Y></point></polygon>"
        "</annotation>"
    )
    out = tmp_path / "png"
    result = invoke("data", "scribblesup-xml", xml_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert "converted 1 annotations" in result.output
    label = cv2.imread(str(out / "2007_000032.png"), cv2.IMREAD_UNCHANGED)
    assert label.shape == (30, 40)
    assert np.nonzero(label[:, 20] == 12)[0].tolist() == [14, 15, 16]
    assert np.nonzero(label[:, 20] == 0)[0].tolist() == [1, 2, 3]
    result = invoke("data", "scribblesup-xml", xml_dir, "--out", out, "--width", "1")
    assert result.exit_code == 0
    assert np.nonzero(cv2.imread(str(out / "2007_000032.png"), 0)[:, 20] == 12)[0].tolist() == [15]

    result = invoke("data", "scribblesup-xml", xml_dir, "--out", out, "--width", "0")
    assert result.exit_code == 2 and "width must be at least 1 px" in result.output

    (xml_dir / "bad.xml").write_text("<annotation><polygon><tag>dragon</tag></polygon></annotation>")
    result = invoke("data", "scribblesup-xml", xml_dir, "--out", out)
    assert result.exit_code == 2
    assert str(xml_dir / "bad.xml") in one_line(result.output) and "'dragon'" in result.output


def test_trivial_writes_scribbles_plus_background(invoke, synth):
    result = invoke("data", "trivial", "--root", synth, "--num-classes", "3")
    assert result.exit_code == 0, result.output
    assert "data.pseudo_label_dir=pseudo_trivial" in one_line(result.output)
    ids = (synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    for sample_id in ids:
        scribble = cv2.imread(str(synth / "pascal_2012_scribble" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(str(synth / "pseudo_trivial" / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        expected = np.where(scribble == 255, 0, scribble)
        assert np.array_equal(label, expected), sample_id


def test_trivial_names_a_bad_scribble(invoke, synth):
    result = invoke("data", "trivial", "--root", synth, "--num-classes", "2")
    assert result.exit_code != 0
    assert "pascal_2012_scribble" in one_line(result.output) and "outside" in one_line(result.output)


def _labels(folder: Path, ids: list[str]) -> dict[str, np.ndarray]:
    return {i: cv2.imread(str(folder / f"{i}.png"), cv2.IMREAD_UNCHANGED) for i in ids}


def test_degrade_with_and_without_the_scribbles(invoke, synth):
    """By default the labels imitate stage 1 (the scribble names the classes and keeps its pixels);
    with --no-scribbles no scribble pixel is pasted in, and at level 0 they are the ground truth."""
    ids = (synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    scribbles = _labels(synth / "pascal_2012_scribble", ids)
    truth = _labels(synth / "SegmentationClassAug", ids)
    result = invoke("data", "degrade", "--root", synth, "--num-classes", "3", "--level", "0.8", "--out", "with")
    assert result.exit_code == 0 and "data.pseudo_label_dir=with" in one_line(result.output), result.output
    with_scribbles = _labels(synth / "with", ids)
    for i in ids:
        scribbled = scribbles[i] != 255
        assert np.array_equal(with_scribbles[i][scribbled], scribbles[i][scribbled]), i
        named = set(np.unique(scribbles[i][scribbled]).tolist()) | {0}
        assert set(np.unique(with_scribbles[i][truth[i] != 255]).tolist()) <= named, i
    result = invoke("data", "degrade", "--root", synth, "--num-classes", "3", "--level", "0", "--no-scribbles",
                    "--out", "exact")  # fmt: skip
    assert result.exit_code == 0 and "100.00 mIoU" in one_line(result.output), result.output
    assert all(np.array_equal(label, truth[i]) for i, label in _labels(synth / "exact", ids).items())
    result = invoke("data", "degrade", "--root", synth, "--num-classes", "3", "--level", "0.8", "--no-scribbles",
                    "--out", "without")  # fmt: skip
    assert result.exit_code == 0, result.output
    without = _labels(synth / "without", ids)
    assert any(not np.array_equal(without[i], with_scribbles[i]) for i in ids)
