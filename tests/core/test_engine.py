"""Engine: schedule, metrics, a perfect predictor, exact resume after an interrupted epoch."""

import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from cdsp_core import runs
from cdsp_core.data.dataset import WholeImageDataset
from cdsp_core.data.files import write_label
from cdsp_core.engine import TrainingDiverged, fit, lr_at
from cdsp_core.evaluation import evaluate
from cdsp_core.metrics import ConfusionMatrix
from cdsp_core.pipeline import run_pipeline
from cdsp_core.runner import Runner, list_checkpoints, load_checkpoint
from cdsp_core.spec import DataSpec, load_spec


def test_lr_schedule_golden_values():
    assert lr_at(0, 100, 10, 1.0) == 0.0  # warm-up starts at 0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 2.0) == pytest.approx(2.0)  # peak after warm-up
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert lr_at(0, 50, 0, 1e-3) == pytest.approx(1e-3)  # no warm-up
    t = 30
    assert lr_at(t, 100, 20, 1.0) == pytest.approx((1 + math.cos(math.pi * 10 / 80)) / 2)


def test_confusion_matrix_golden_miou_and_ignore():
    cm = ConfusionMatrix(3)
    target = torch.tensor([0, 0, 1, 1, 255, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    cm.update(pred, target)
    # IoU0 = 1/2, IoU1 = 2/3, IoU2 = 1 (the 255 pixel is skipped).
    assert cm.miou() == pytest.approx(100 * (1 / 2 + 2 / 3 + 1) / 3)
    assert cm.per_class() == pytest.approx([50.0, 66.6667, 100.0], abs=1e-3)
    absent = ConfusionMatrix(4)
    absent.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert absent.miou() == 100.0 and absent.per_class()[2:] == [None, None]  # absent classes excluded
    doubled = ConfusionMatrix(3)
    doubled.update(pred, target)
    doubled.all_reduce(lambda t: t * 2)  # what an all-reduce over two identical ranks gives
    assert doubled.miou() == pytest.approx(cm.miou())


def test_a_pixel_given_no_class_is_a_miss_for_its_class_and_a_false_positive_for_none():
    """An external pseudo-label leaves pixels at 255: each counts against its ground-truth class only
    (it used to land in another class's cell, or to break the matrix's shape)."""
    k = 21
    cm = ConfusionMatrix(k)
    target = torch.tensor([0, 0, 3, 3, 15, 15, 255])
    pred = torch.tensor([0, 255, 3, 3, 15, 255, 255])
    cm.update(pred, target)
    # IoU0 = 1/2, IoU3 = 1, IoU15 = 1/2; every other class absent (NaN), the 255-target pixel skipped.
    assert cm.miou() == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert cm.mat.sum() == 6 and cm.mat[:, k].tolist()[0] == 1 and cm.mat[:, k].tolist()[15] == 1
    assert cm.pixel_accuracy() == pytest.approx(100 * 4 / 6)


COLOURS = torch.tensor([[0.0, 0.0, 0.0], [255.0, 0.0, 0.0], [0.0, 255.0, 0.0]])


class ColourOracle(nn.Module):
    """Logits = minus the distance of each pixel's colour to each class colour: perfect on flat data."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        rgb = (images * std + mean) * 255  # (B, 3, H, W)
        d = ((rgb.unsqueeze(1) - COLOURS.view(1, 3, 3, 1, 1)) ** 2).sum(2)
        return {"logits": -d}


def flat_dataset(root, n=5, size=(20, 28)):
    rng = np.random.default_rng(0)
    (root / "ImageSets/SegmentationAug").mkdir(parents=True)
    ids = []
    for i in range(n):
        label = rng.integers(0, 3, size=(size[0] // 4, size[1] // 4)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        image = COLOURS.numpy()[label].astype(np.uint8)
        import cv2

        (root / "JPEGImages").mkdir(exist_ok=True)
        # Full chroma resolution, so that JPEG keeps the colour edges where the labels have them.
        params = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        cv2.imwrite(str(root / "JPEGImages" / f"im{i}.jpg"), image[..., ::-1], params)
        write_label(root / "SegmentationClassAug" / f"im{i}.png", label)
        ids.append(f"im{i}")
    (root / "ImageSets/SegmentationAug/val.txt").write_text("\n".join(ids) + "\n")
    return DataSpec(root=str(root), num_classes=3)


def test_a_perfect_predictor_scores_100(tmp_path):
    data = flat_dataset(tmp_path)
    val = WholeImageDataset(data, "val", {"gt": tmp_path / "SegmentationClassAug"})
    runner = Runner(run=str(tmp_path / "run"))
    cm = evaluate(ColourOracle(), val, runner, 3, batch_size=2)
    assert cm.miou() == 100.0 and cm.mat.sum() == 5 * 20 * 28
    flipped = evaluate(ColourOracle(), val, runner, 3, flip=True, batch_size=3)
    assert flipped.miou() == 100.0
    # Sharded over two "ranks" whose counts are summed, as under DDP: still every pixel once.
    shards = [evaluate(ColourOracle(), val, Runner(run="x", rank=r, world_size=2), 3) for r in (0, 1)]
    assert sum(int(s.mat.sum()) for s in shards) == 5 * 20 * 28


def tiny_spec(root, **overrides):
    base = {
        "name": "tiny",
        "kind": "stage2",
        "seed": 3,
        "data": {
            "root": str(root),
            "num_classes": 3,
            "crop_size": 48,
            "loader_workers": 0,
            "pseudo_label_dir": "SegmentationClassAug",  # ground truth as the external pseudo-label
        },
        "stage1": {"backbone": "resnet18", "output_stride": 8, "epochs": 1, "batch_size": 4, "lr": 0.05},
        "stage2": {
            "segmentor": "deeplabv3plus",
            "backbone": "resnet18",
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.02,
            "warmup_epochs": 1,
        },
    }
    return load_spec(base, [f"{k}={v}" for k, v in overrides.items()])


class Interrupt(RuntimeError):
    pass


def straight_and_interrupted(spec, tmp_path, name: str) -> tuple[str, str]:
    """A run straight through, and one stopped in stage 2's second epoch (its first checkpoint kept)."""
    straight = str(tmp_path / "straight")
    run_pipeline(spec, straight, Runner(run=straight, progress=False), figures=False)
    broken = str(tmp_path / name)

    def die_in_epoch_2(stage, epoch, step):
        if stage == "stage2" and epoch == 2:
            raise Interrupt(f"killed at step {step}")

    with pytest.raises(Interrupt):
        run_pipeline(spec, broken, Runner(run=broken, progress=False, on_step=die_in_epoch_2), figures=False)
    return straight, broken


@pytest.mark.slow
def test_resume_after_an_interrupted_epoch_is_exact(tiny_synth, tmp_path):
    spec = tiny_spec(tiny_synth)
    straight, broken = straight_and_interrupted(spec, tmp_path, "broken")
    assert list_checkpoints(broken, "stage2") == ["stage2-epoch001.pt"]
    logs = []
    result = run_pipeline(spec, broken, Runner(run=broken, progress=False, log=logs.append), figures=False)
    assert any("resuming" in line and "epoch 2" in line for line in logs)

    epochs = [r["epoch"] for r in runs.read_jsonl(runs.join(broken, runs.METRICS)) if r["stage"] == "stage2"]
    assert epochs == [1, 2]  # epoch 1 was not trained again
    a = load_checkpoint(runs.local_path(runs.join(straight, "checkpoints/stage2-epoch002.pt")))
    b = load_checkpoint(runs.local_path(runs.join(broken, "checkpoints/stage2-epoch002.pt")))
    assert a["step"] == b["step"] == 4
    # The schedule (a LambdaLR over lr_at) resumes too: 2 steps per epoch, warm-up over the first epoch,
    # so the last step of each epoch runs at half the base rate (end of warm-up; half-way down the cosine).
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 4
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    for run in (straight, broken):
        rates = [r["lr"] for r in runs.read_jsonl(runs.join(run, runs.METRICS)) if r["stage"] == "stage2"]
        assert rates == pytest.approx([0.01, 0.01]), run
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb and torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert result["miou"] == pytest.approx(runs.read_json(runs.join(straight, runs.RESULT))["miou"])


@pytest.mark.slow
def test_a_checkpoint_without_the_schedule_resumes_where_its_step_count_says(tiny_synth, tmp_path):
    """Checkpoints written before the schedule was saved kept each group's base rate as "base_lr"."""
    spec = tiny_spec(tiny_synth)
    straight, old = straight_and_interrupted(spec, tmp_path, "old")
    path = runs.local_path(runs.join(old, "checkpoints/stage2-epoch001.pt"))
    state = load_checkpoint(path)
    del state["scheduler"]
    for group in state["optimizer"]["param_groups"]:
        group["base_lr"] = group.pop("initial_lr")
    torch.save(state, path)
    run_pipeline(spec, old, Runner(run=old, progress=False), figures=False)
    a = load_checkpoint(runs.local_path(runs.join(straight, "checkpoints/stage2-epoch002.pt")))
    b = load_checkpoint(runs.local_path(runs.join(old, "checkpoints/stage2-epoch002.pt")))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.slow
def test_a_finished_run_resumes_to_the_same_result(tiny_synth, tmp_path):
    spec = tiny_spec(tiny_synth, **{"stage2.epochs": 1})
    out = str(tmp_path / "run")
    first = run_pipeline(spec, out, Runner(run=out, progress=False), figures=False)
    logs = []
    again = run_pipeline(spec, out, Runner(run=out, progress=False, log=logs.append), figures=False)
    assert again["miou"] == first["miou"]
    assert len([r for r in runs.read_jsonl(runs.join(out, runs.METRICS)) if r["stage"] == "stage2"]) == 1


def test_a_run_killed_between_checkpoint_and_metrics_row_logs_that_epoch_once(tiny_synth, tmp_path):
    """The checkpoint is written before its epoch's row; a resumed run appends a row its checkpoint has
    and metrics.jsonl lacks (the process died in between), so every epoch is logged exactly once."""
    spec = tiny_spec(tiny_synth, **{"stage2.epochs": 1})
    out = str(tmp_path / "run")

    def die_after_the_checkpoint(run: str, row: dict) -> None:
        raise Interrupt("killed between the checkpoint and its row")

    import cdsp_core.engine as engine

    original = engine.append_metrics
    engine.append_metrics = die_after_the_checkpoint
    try:
        with pytest.raises(Interrupt):
            run_pipeline(spec, out, Runner(run=out, progress=False), figures=False)
    finally:
        engine.append_metrics = original
    assert list_checkpoints(out, "stage2") == ["stage2-epoch001.pt"]
    assert not [r for r in runs.read_jsonl(runs.join(out, runs.METRICS)) if r["stage"] == "stage2"]
    run_pipeline(spec, out, Runner(run=out, progress=False), figures=False)
    rows = [r for r in runs.read_jsonl(runs.join(out, runs.METRICS)) if r["stage"] == "stage2"]
    assert [r["epoch"] for r in rows] == [1]
    run_pipeline(spec, out, Runner(run=out, progress=False), figures=False)  # finished: nothing appended
    assert len([r for r in runs.read_jsonl(runs.join(out, runs.METRICS)) if r["stage"] == "stage2"]) == 1


def test_a_diverged_epoch_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny_synth, tmp_path):
    """The loss turns NaN in epoch 2 (as with too high a rate): the stage stops there, naming the epoch
    and the rate, and saves nothing of that epoch, so a retry resumes from epoch 1's weights."""
    spec = tiny_spec(tiny_synth)
    out = str(tmp_path / "run")
    model = nn.Linear(2, 1)
    batches = [torch.ones(2, 2), torch.ones(2, 2)]

    def poisoned_in_epoch_2(net, batch, step):
        loss = net(batch).pow(2).mean()
        return (loss * float("nan") if step >= 2 else loss), {"segs": loss.detach()}

    def sgd(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)

    with pytest.raises(TrainingDiverged, match=r"stage2 epoch 2: the training loss is nan .* Lower stage2.lr"):
        fit("stage2", model, sgd, batches, poisoned_in_epoch_2, Runner(run=out, progress=False), spec,
            epochs=3, warmup_epochs=0, keep=5, amp=False)  # fmt: skip
    assert list_checkpoints(out, "stage2") == ["stage2-epoch001.pt"]
    assert [r["epoch"] for r in runs.read_jsonl(runs.join(out, runs.METRICS))] == [1]
    weights = load_checkpoint(runs.local_path(runs.join(out, "checkpoints/stage2-epoch001.pt")))["model"]
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())


def test_dataset_problems_fail_before_training(tmp_path, tiny_synth):
    root = tmp_path / "broken"
    shutil.copytree(tiny_synth, root)
    shutil.rmtree(root / "JPEGImages")
    spec = tiny_spec(root)
    with pytest.raises(ValueError, match="JPEGImages"):
        run_pipeline(spec, str(tmp_path / "run"), figures=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_model_and_batches_share_the_runners_device(tiny_synth, tmp_path, monkeypatch, stage):
    """The plain runner's model goes where its batches go (a one-GPU `cdsp run` crashed when it did not).

    CPU-only machines give the runner the meta device: a model left on the CPU would meet meta
    batches. The model's first forward pass compares the devices, then stops the run.
    """
    from cdsp_core import classifier, segmentor

    def checked(build):
        def build_and_watch(*args, **kwargs):
            model = build(*args, **kwargs)

            def compare(module, inputs):
                weights = next(module.parameters()).device
                assert inputs[0].device == weights == torch.device("meta"), (inputs[0].device, weights)
                raise Interrupt("same device")

            model.register_forward_pre_hook(compare)
            return model

        return build_and_watch

    monkeypatch.setattr(classifier, "build_stage1_model", checked(classifier.build_stage1_model))
    monkeypatch.setattr(segmentor, "build_stage2_model", checked(segmentor.build_stage2_model))
    spec = tiny_spec(tiny_synth, **{"stage1.method": "dense"})
    runner = Runner(run=str(tmp_path), device=torch.device("meta"), progress=False)
    scribbles = tiny_synth / "pascal_2012_scribble"
    with pytest.raises(Interrupt, match="same device"):
        if stage == "stage1":
            classifier.train_classifier(spec, runner, scribble_dir=scribbles)
        else:
            pseudo = tiny_synth / "SegmentationClassAug"
            segmentor.train_segmentor(spec, runner, scribble_dir=scribbles, pseudo_dir=pseudo)
