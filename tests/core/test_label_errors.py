"""benchmarks/label_errors.py: per-class recall and precision of pseudo-label folders, and the files
it writes."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from benchmarks import common, label_errors
from cdsp_core.data.degrade import write_trivial
from cdsp_core.data.synthetic import generate
from cdsp_core.spec import DataSpec


def test_class_errors_by_hand():
    # Truth in rows, label in columns. Class 1: 8 true pixels, 6 found (recall 0.75), 10 labelled 1
    # of which 6 are right (precision 0.6): too large, as an over-grown object shows.
    mat = np.array([[20, 4, 0], [2, 6, 0], [0, 0, 0]])
    errs = label_errors.class_errors(mat)
    assert errs["recall"][:2] == pytest.approx([20 / 24, 0.75])
    assert errs["precision"][:2] == pytest.approx([20 / 22, 0.6])
    assert errs["iou"][:2] == pytest.approx([20 / 26, 6 / 12])
    assert errs["recall"][2] is None and errs["precision"][2] is None  # absent: no figure, not 0
    assert errs["miou"] == pytest.approx((20 / 26 + 6 / 12) / 2)
    # By share of the true class: a quarter of class 1 before a sixth of the background.
    assert errs["confusions"] == [(1, 0, pytest.approx(2 / 8)), (0, 1, pytest.approx(4 / 24))]


def test_unlabelled_pixels_are_misses_as_in_the_projects_metric():
    """A K x (K + 1) matrix: the last column counts pixels a folder left without a class (255)."""
    from cdsp_core.metrics import ConfusionMatrix

    mat = np.array([[6, 0, 2], [1, 3, 0]])  # background: 2 of 8 unlabelled; class 1: 1 of 4 taken as background
    errs = label_errors.class_errors(mat)
    assert errs["recall"] == pytest.approx([6 / 8, 3 / 4]) and errs["precision"] == pytest.approx([6 / 7, 1.0])
    assert errs["confusions"][0] == (0, 2, pytest.approx(2 / 8))  # truth 0 -> "no class"
    import torch

    gt = torch.tensor([0] * 8 + [1] * 4)
    label = torch.tensor([0] * 6 + [255] * 2 + [0] + [1] * 3)
    cm = ConfusionMatrix(2, torch.device("cpu"))
    cm.update(label, gt)
    assert 100 * errs["miou"] == pytest.approx(cm.miou())
    assert label_errors.class_errors(np.zeros((2, 3)))["miou"] is None  # no pixel at all: no figure


def test_the_truth_scores_100_and_the_trivial_label_less_with_names_and_files(tmp_path, monkeypatch, capsys):
    root = tmp_path / "synth"
    generate(root, num_train=4, num_val=1, size=33, num_classes=3, seed=0)
    trivial = root / write_trivial(DataSpec(root=str(root), num_classes=3))
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(sys, "argv", ["label_errors.py", "--root", str(root), "--classes", "3",
                                      f"truth={root / 'SegmentationClassAug'}", f"trivial={trivial}"])  # fmt: skip
    label_errors.main()
    out = json.loads((tmp_path / "results/label_errors-synth.json").read_text())
    assert out["classes"][0] == "background" and out["classes"][1] != "1"  # names from meta.json
    assert out["folders"]["truth"]["miou"] == 1.0 and out["folders"]["truth"]["confusions"] == []
    trivial_errs = out["folders"]["trivial"]
    # The trivial label keeps only scribbled foreground: precision 1 on the objects, recall far below.
    assert all(p == 1.0 for p in trivial_errs["precision"][1:])
    assert all(r < 0.5 for r in trivial_errs["recall"][1:])
    md = (tmp_path / "results/label_errors-synth.md").read_text()
    assert "## trivial: mIoU" in md and out["classes"][1] in md
    assert "wrote" in capsys.readouterr().out


def test_a_folder_missing_a_training_label_is_named(tmp_path, monkeypatch):
    root = tmp_path / "synth"
    generate(root, num_train=2, num_val=1, size=33, num_classes=3, seed=0)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    argv = ["label_errors.py", "--root", str(root), "--classes", "3", f"x={tmp_path / 'empty'}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="no pseudo-label for training image"):
        label_errors.main()
