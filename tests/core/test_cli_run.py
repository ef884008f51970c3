"""`cdsp run` then `cdsp predict` on a tiny dataset: every artifact of the run folder, and masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cdsp_core import cli, runs
from cdsp_core.figures import colourize
from cdsp_core.runs import QUALITY_KEYS
from service.cli import app

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def invoke(monkeypatch):
    for console in (cli.console, cli.err):
        monkeypatch.setattr(console, "_width", 1000)

    def run(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args])

    return run


def test_run_writes_every_artifact_and_predict_writes_masks(invoke, tiny_synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = [
        f"data.root={tiny_synth}", "data.num_classes=3", "data.loader_workers=0",
        "stage1.epochs=1", "stage1.round_epochs=1", "stage1.batch_size=4", "stage1.cam_scales=[1.0]",
        "stage2.epochs=2", "stage2.batch_size=4", "stage2.eval_every=1",
    ]  # fmt: skip
    sets = [a for o in overrides for a in ("--set", o)]
    result = invoke("run", REPO / "configs" / "synthetic-demo.yaml", *sets, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output

    # The printed summary and result.json agree.
    saved = json.loads((out / runs.RESULT).read_text())
    assert 0.0 <= saved["miou"] <= 100.0 and all(0.0 <= saved[k] <= 100.0 for k in QUALITY_KEYS)
    assert f"{saved['miou']:.2f}" in result.output
    assert f"trivial label {saved['trivial_label_miou']:.2f}" in result.output
    assert len(saved["per_class_iou"]) == 3
    assert saved["epochs"] == {"stage1": 2, "stage2": 2}  # the recipe's two stage-1 rounds of one epoch
    assert saved["checkpoint"] == "checkpoints/stage2-epoch002.pt"

    # spec.yaml is the resolved spec; metrics.jsonl has one row per epoch of each stage.
    spec = yaml.safe_load((out / runs.SPEC).read_text())
    assert spec["data"]["root"] == str(tiny_synth) and spec["stage2"]["epochs"] == 2
    rows = [json.loads(line) for line in (out / runs.METRICS).read_text().splitlines()]
    epochs = [(r["stage"], r["epoch"]) for r in rows if "epoch" in r]
    assert ("stage1", 1) in epochs and ("stage2", 1) in epochs and ("stage2", 2) in epochs
    assert all("miou" in r for r in rows if r.get("stage") == "stage2" and "epoch" in r)

    # One pseudo-label per training image, valid labels, the size of its image.
    ids = (tiny_synth / "ImageSets/SegmentationAug/train.txt").read_text().split()
    for sample_id in ids:
        label = cv2.imread(str(out / runs.PSEUDO_LABELS / f"{sample_id}.png"), cv2.IMREAD_UNCHANGED)
        assert label is not None and label.shape == (64, 64)
        assert set(np.unique(label)) <= {0, 1, 2, 255}

    assert (out / runs.CHECKPOINTS / "stage2-epoch002.pt").is_file()
    figures = {p.name for p in (out / runs.FIGURES).iterdir()}
    assert {"samples.png", "miou.png"} <= figures
    assert [p.name for p in (out / "tb").iterdir()] == ["events.out.tfevents.cdsp"]  # tensorboard --logdir
    grid = cv2.imread(str(out / runs.FIGURES / "samples.png"))
    assert grid is not None and grid.shape[1] > grid.shape[0]  # six columns of panels

    # predict: one colour mask per image, in the VOC palette, plus the raw labels on request.
    image = tiny_synth / "JPEGImages" / f"{ids[0]}.jpg"
    masks = tmp_path / "masks"
    result = invoke("predict", out / saved["checkpoint"], image, "--out", masks, "--raw")
    assert result.exit_code == 0, result.output
    colour = cv2.cvtColor(cv2.imread(str(masks / f"{ids[0]}.png")), cv2.COLOR_BGR2RGB)
    raw = cv2.imread(str(masks / f"{ids[0]}_label.png"), cv2.IMREAD_UNCHANGED)
    assert raw.shape == colour.shape[:2] == (64, 64)
    assert set(np.unique(raw)) <= {0, 1, 2}
    assert np.array_equal(colour, colourize(raw))


def test_predict_names_a_missing_checkpoint(invoke, tmp_path: Path) -> None:
    result = invoke("predict", tmp_path / "nope.pt", tmp_path / "x.jpg", "--out", tmp_path / "m")
    assert result.exit_code != 0
    assert "nope.pt" in result.output


def test_ray_is_a_flag_and_the_cluster_an_option(invoke, tmp_path: Path) -> None:
    """`--ray` takes no value (a word after it is refused by name); `--address` names the cluster."""
    result = invoke("run", REPO / "configs/synthetic-demo.yaml", "--out", tmp_path / "o", "--ray", "local")
    assert result.exit_code == 2 and "local" in result.output
    help_text = " ".join(invoke("run", "--help").output.split())
    assert "--ray" in help_text and "--address" in help_text and "implies --ray" in help_text


def test_a_checkpoint_trained_from_imagenet_weights_loads_where_those_weights_are_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prediction takes every weight from the checkpoint: it never needs the backbone's initial weights
    (it used to rebuild the model with them and fail on a machine without the ImageNet file)."""
    from cdsp_core.predict import load_segmentor
    from cdsp_core.segmentor import build_stage2_model
    from cdsp_core.spec import validate_spec

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    raw = {"name": "imagenet-init", "kind": "stage2", "data": {"num_classes": 3, "pseudo_label_dir": "p"}}
    raw["stage2"] = {"backbone": "resnet18", "pretrained": "imagenet"}
    spec = validate_spec(raw)
    with pytest.raises(FileNotFoundError, match="no ImageNet weights"):
        build_stage2_model(spec)  # what the machine lacks
    trained = build_stage2_model(spec, pretrained=False)
    checkpoint = tmp_path / "stage2-epoch001.pt"
    torch.save({"stage": "stage2", "spec": spec.model_dump(mode="json"), "model": trained.state_dict()}, checkpoint)
    model, _ = load_segmentor(str(checkpoint))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained.state_dict()[name]), name


def test_errors_print_paths_as_text_not_markup(invoke, tmp_path: Path) -> None:
    """A path with `[/x]` or `[bold]` in it comes back whole in the error (rich read it as markup: a
    traceback for a closing tag, a wrong file name for an opening one)."""
    for name in ("run[/x].yaml", "run[bold].yaml"):
        result = invoke("run", tmp_path / name, "--out", tmp_path / "o")
        assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output


def test_predict_refuses_bad_inputs_by_name_before_loading(invoke, tmp_path: Path) -> None:
    """Each bad input is one line naming it, exit 2, and no mask is written."""
    import cv2 as cv

    for folder in ("a b", "c"):
        (tmp_path / folder).mkdir()
        cv.imwrite(str(tmp_path / folder / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    junk = tmp_path / "junk.pt"
    junk.write_text("garbage\n")
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    a, c, out = tmp_path / "a b" / "x.jpg", tmp_path / "c" / "x.jpg", tmp_path / "masks"
    cases = {
        "would both write x.png": ("predict", junk, a, c, "--out", out),
        "is a file; give a folder": ("predict", junk, a, "--out", junk),
        "--device 'bogus'": ("predict", junk, a, "--out", out, "--device", "bogus"),
        f"checkpoint {junk}: not a readable checkpoint": ("predict", junk, a, "--out", out),
        f"checkpoint {listing}: not a cdsp checkpoint": ("predict", listing, a, "--out", out),
    }
    if not torch.cuda.is_available():
        cases["no CUDA device is visible"] = ("predict", junk, a, "--out", out, "--device", "cuda")
    for expected, args in cases.items():
        result = invoke(*args)
        assert result.exit_code == 2 and expected in result.output, (expected, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()


def test_external_pseudo_labels_under_a_relative_dataset_root(
    invoke, tiny_synth: Path, tmp_path: Path, monkeypatch
) -> None:
    """The demo recipe's root is relative (data/synthetic): its pseudo-label folder was joined to the root
    twice (data/synthetic/data/synthetic/pseudo_trivial) and stage 2 found no label."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_synth, tmp_path / "data" / "s")
    assert invoke("data", "trivial", "--root", "data/s", "--num-classes", "3").exit_code == 0
    sets = ["data.root=data/s", "data.num_classes=3", "data.crop_size=64", "kind=stage2", "stage2.epochs=1",
            "stage2.batch_size=4", "data.pseudo_label_dir=pseudo_trivial", "data.loader_workers=0",
            "stage2.backbone=resnet18"]  # fmt: skip
    result = invoke("run", REPO / "configs" / "synthetic-demo.yaml", *[f"--set={s}" for s in sets],
                    "--out", "runs/t", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs/t/result.json").is_file()
