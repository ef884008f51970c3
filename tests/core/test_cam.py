"""Stage 1: CAM pseudo-labels on toy cases where the right answer is known."""

import numpy as np
import pytest
import torch
from torch import nn

from cdsp_core import runs
from cdsp_core.cam import compute_cams, generate_pseudo_labels, pseudo_label
from cdsp_core.data.files import read_label, write_label
from cdsp_core.runner import Runner
from cdsp_core.spec import ExperimentSpec


def test_pseudo_label_thresholds_present_classes_and_keeps_scribbles():
    cams = torch.zeros(3, 4, 6)  # K = 4: classes 1..3
    cams[0, :, :3] = torch.tensor([2.0, 1.0, 0.2])  # class 1: strong, medium, weak columns
    cams[1, :, 3:] = 5.0  # class 2: strong on the right, but absent from the image
    cams[2, 2:, 4:] = 1.0  # class 3: present, bottom-right corner
    present = torch.tensor([True, False, True])
    scribble = torch.full((4, 6), 255, dtype=torch.uint8)
    scribble[0, 5] = 2  # a scribbled pixel keeps its class even if the CAMs disagree
    scribble[3, 0] = 0
    label = pseudo_label(cams, present, 0.3, scribble)
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 2],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 3, 3],
            [0, 1, 0, 0, 3, 3],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(label.numpy(), expected)  # class 1 normalised by 2: 1, 0.5, 0.1
    assert label.dtype == torch.uint8


class RedAndGreen(nn.Module):
    """A toy classifier whose CAMs are the red (class 1) and green (class 2) intensity."""

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(images[:, :2])  # (B, 2, H, W) from normalised R and G


def toy_dataset(root):
    """Two images: a red square (class 1) and a green one (class 2) on black; one-pixel scribbles."""
    import cv2

    (root / "ImageSets/SegmentationAug").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    ids = []
    for i, (cls, colour) in enumerate([(1, (255, 0, 0)), (2, (0, 255, 0))]):
        image = np.zeros((32, 32, 3), np.uint8)
        image[8:24, 10:26] = colour
        gt = np.zeros((32, 32), np.uint8)
        gt[8:24, 10:26] = cls
        scribble = np.full((32, 32), 255, np.uint8)
        scribble[16, 18] = cls
        scribble[2, 2] = 0
        cv2.imwrite(str(root / "JPEGImages" / f"t{i}.jpg"), image[..., ::-1])
        write_label(root / "SegmentationClassAug" / f"t{i}.png", gt)
        write_label(root / "pascal_2012_scribble" / f"t{i}.png", scribble)
        ids.append(f"t{i}")
    (root / "ImageSets/SegmentationAug/train.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets/SegmentationAug/val.txt").write_text("\n".join(ids) + "\n")


def test_generate_pseudo_labels_recovers_the_squares(tmp_path):
    toy_dataset(tmp_path)
    spec = ExperimentSpec.model_validate(
        {"data": {"root": str(tmp_path), "num_classes": 3, "loader_workers": 0},
         "stage1": {"cam_threshold": 0.5, "cam_scales": [1.0, 0.5, 1.5]}}
    )  # fmt: skip
    out = tmp_path / "pseudo"
    cm = generate_pseudo_labels(
        RedAndGreen(), spec, Runner(run=str(tmp_path)), scribble_dir=tmp_path / "pascal_2012_scribble", out_dir=out
    )
    assert cm is not None
    for i, cls in enumerate((1, 2)):
        label = read_label(out / f"t{i}.png", 3)
        gt = read_label(tmp_path / "SegmentationClassAug" / f"t{i}.png", 3)
        # JPEG edges blur by a pixel: all but the square's outline is exactly right.
        assert (label == gt).mean() > 0.97
        assert set(np.unique(label)) == {0, cls}  # the absent class never appears
    assert cm.miou() > 90.0


def test_compute_cams_averages_flips_back_into_place():
    class LeftHalf(nn.Module):
        def cams(self, images):
            out = torch.zeros(images.shape[0], 1, *images.shape[-2:])
            out[..., : images.shape[-1] // 2] = 1.0  # always the left half of what it sees
            return out

    cams = compute_cams(LeftHalf(), torch.zeros(3, 4, 8), scales=(1.0,))
    # The image's left half plus the mirrored view's left half (the image's right half).
    torch.testing.assert_close(cams, torch.ones(1, 4, 8))


@pytest.mark.slow
def test_stage1_training_learns_the_image_labels_and_writes_valid_pseudo_labels(tmp_path):
    """Stage 1 end to end on an easy case: the classifier learns which class each image holds, and
    the pseudo-labels name only that class, keep the scribbles and use the label convention.

    (How well CAMs of a classifier trained from scratch localise is measured by the accuracy study,
    not pinned here: on images this small it is weak, see benchmarks/results/synthetic-accuracy.md.)
    """
    import cv2

    from cdsp_core.engine import train_classifier

    rng = np.random.default_rng(0)
    root = tmp_path / "toy"
    (root / "ImageSets/SegmentationAug").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    ids, classes = [], []
    for i in range(48):
        cls = i % 3  # 0: background only
        image = (rng.random((48, 48, 3)) * 40).astype(np.uint8)
        gt = np.zeros((48, 48), np.uint8)
        scribble = np.full((48, 48), 255, np.uint8)
        scribble[:3, :10] = 0
        if cls:
            y, x = rng.integers(4, 20, 2)
            image[y : y + 24, x : x + 24] = (230, 40, 40) if cls == 1 else (40, 40, 230)
            gt[y : y + 24, x : x + 24] = cls
            scribble[y + 11 : y + 14, x + 6 : x + 18] = cls
        cv2.imwrite(str(root / "JPEGImages" / f"s{i}.jpg"), image[..., ::-1])
        write_label(root / "SegmentationClassAug" / f"s{i}.png", gt)
        write_label(root / "pascal_2012_scribble" / f"s{i}.png", scribble)
        ids.append(f"s{i}")
        classes.append(cls)
    for split in ("train", "val"):
        (root / f"ImageSets/SegmentationAug/{split}.txt").write_text("\n".join(ids) + "\n")
    spec = ExperimentSpec.model_validate(
        {
            "seed": 0,
            "data": {"root": str(root), "num_classes": 3, "crop_size": 48, "loader_workers": 0, "augment": False},
            "stage1": {"backbone": "resnet18", "output_stride": 8, "epochs": 5, "batch_size": 8, "lr": 0.05,
                       "cam_threshold": 0.5, "cam_scales": [1.0]},
        }
    )  # fmt: skip
    runner = Runner(run=str(tmp_path / "run"), progress=False, verbose=False)
    model = train_classifier(spec, runner, scribble_dir=root / "pascal_2012_scribble")
    losses = [r["loss"] for r in runs.read_jsonl(runs.join(runner.run, runs.METRICS))]
    assert losses[-1] < 0.5 * losses[0]
    from cdsp_core.data.dataset import WholeImageDataset

    model.eval()
    data = WholeImageDataset(spec.data, "train", {})
    with torch.no_grad():
        predicted = [(torch.sigmoid(model(data[i]["image"][None]))[0] > 0.5).numpy() for i in range(len(data))]
    truth = [np.array([c == 1, c == 2]) for c in classes]
    assert np.mean([np.array_equal(p, t) for p, t in zip(predicted, truth, strict=True)]) >= 0.9
    out = tmp_path / "pl"
    cm = generate_pseudo_labels(model, spec, runner, scribble_dir=root / "pascal_2012_scribble", out_dir=out)
    assert cm is not None and cm.mat.sum() == 48 * 48 * 48
    for sample_id, cls in zip(ids, classes, strict=True):
        label = read_label(out / f"{sample_id}.png", 3)
        scribble = read_label(root / "pascal_2012_scribble" / f"{sample_id}.png", 3)
        assert set(np.unique(label)) <= {0, cls}
        np.testing.assert_array_equal(label[scribble != 255], scribble[scribble != 255])
