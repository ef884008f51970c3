"""Checks a launcher makes before torch, Ray or a cluster: finished runs, datasets, search spaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdsp_core.data.layout import DatasetError, check_dataset
from cdsp_core.runs import finished_result
from cdsp_core.spec import SpecError
from tests.workers.helpers import tiny_spec


def test_finished_result_only_for_the_same_spec(tiny_synth: Path, tmp_path: Path) -> None:
    spec = tiny_spec(tiny_synth)
    assert finished_result(spec, str(tmp_path)) is None  # empty folder
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    assert finished_result(spec, str(tmp_path)) is None  # no result.json yet: resume, not done
    (tmp_path / "result.json").write_text(json.dumps({"miou": 1.5}))
    assert finished_result(spec, str(tmp_path)) == {"miou": 1.5}
    assert finished_result(spec.with_overrides({"stage2.epochs": 3}), str(tmp_path)) is None


def test_check_dataset_names_the_field(tiny_synth: Path) -> None:
    check_dataset(tiny_spec(tiny_synth))
    with pytest.raises(DatasetError, match=r"^dataset problems: data.scribble_dir: folder .*/nope is missing"):
        check_dataset(tiny_spec(tiny_synth, data__scribble_dir="nope"))


def test_check_dataset_refuses_a_split_too_small_for_the_batch(tiny_synth: Path) -> None:
    with pytest.raises(DatasetError, match=r"stage 1: the training split has 8 images, too few for batch size 16"):
        check_dataset(tiny_spec(tiny_synth, stage1__batch_size=16))
    external = {"kind": "stage2", "data__pseudo_label_dir": "SegmentationClassAug"}
    with pytest.raises(
        DatasetError, match=r"stage 2: the training split has 8 images, too few for batch size 12 over 4"
    ):
        check_dataset(tiny_spec(tiny_synth, stage2__batch_size=12, resources__num_workers=4, **external))
    check_dataset(tiny_spec(tiny_synth, stage1__batch_size=16, **external))  # stage 1 does not run


def test_stage1_keys_cannot_be_searched_when_pseudo_labels_are_shared(tiny_synth: Path) -> None:
    space = {"stage1.lr": {"grid": [0.01, 0.1]}}
    with pytest.raises(SpecError, match=r"search.space: \['stage1.lr'\] change stage 1"):
        tiny_spec(tiny_synth, kind="search", search__space=space)
    # With external pseudo-labels stage 1 does not run: nothing is shared, the key is harmless.
    tiny_spec(tiny_synth, kind="search", search__space=space, data__pseudo_label_dir="x")
    tiny_spec(tiny_synth, kind="search", search__space={"data.drop_ratio": {"grid": [0.0, 0.5]}})
