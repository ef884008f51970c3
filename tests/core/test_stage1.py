"""Our dense stage 1: its loss, the present-class restriction, refinement, quality figures, determinism."""

import math

import numpy as np
import pytest
import torch

from cdsp_core.cam import dense_probs, generate_pseudo_labels, pseudo_label, refine
from cdsp_core.classifier import average_precision, f1_per_class, restrict_to_present, stage1_loss
from cdsp_core.metrics import LabelQuality
from cdsp_core.models import build_classifier
from cdsp_core.runner import Runner
from cdsp_core.spec import ExperimentSpec, Stage1Spec
from tests.core.test_cam import squares_dataset


def _batch(scribble: torch.Tensor, present: list[bool]) -> dict[str, torch.Tensor]:
    k = len(present)
    return {
        "labels": torch.tensor([present[1:]], dtype=torch.float32),
        "known": torch.ones(1, k - 1),
        "present": torch.tensor([present]),
        "scribble": scribble[None],
    }


def test_dense_loss_sees_only_scribbled_pixels():
    torch.manual_seed(0)
    maps = torch.randn(1, 4, 8, 8, requires_grad=True)  # logits at the label's size: no upsampling
    scribble = torch.full((8, 8), 255)
    scribble[2, 1:6] = 1
    scribble[7, :] = 0  # a background stroke is supervised too
    out = {"maps": maps, "logits": torch.zeros(1, 3)}  # image logits apart: the gradient is the dense term's
    batch = _batch(scribble, [True, True, False, True])
    loss, terms = stage1_loss(out, batch, dense_weight=1.0)
    (grad,) = torch.autograd.grad(loss, maps)
    unscribbled = scribble == 255
    assert grad[0][:, unscribbled].abs().max() == 0  # no gradient where nothing is scribbled
    assert grad[0][:, ~unscribbled].abs().max() > 0
    assert grad[0, 2].abs().max() == 0  # the absent class is never a choice, so no gradient either
    # Changing the maps on unscribbled pixels leaves the dense term as it was.
    other = maps.detach().clone()
    other[..., unscribbled] += 5 * torch.randn_like(other[..., unscribbled])
    _, terms2 = stage1_loss({"maps": other, "logits": out["logits"]}, batch, dense_weight=1.0)
    torch.testing.assert_close(terms2["dense"], terms["dense"])


def test_dense_loss_golden_value_and_weight():
    maps = torch.zeros(1, 3, 4, 4)  # uniform logits
    scribble = torch.full((4, 4), 255)
    scribble[0, 0] = 1
    out = {"maps": maps, "logits": torch.zeros(1, 2)}
    # Two classes present (background and 1): uniform over them gives log 2; image loss log 2 too.
    loss, terms = stage1_loss(out, _batch(scribble, [True, True, False]), dense_weight=0.5)
    torch.testing.assert_close(terms["dense"], torch.tensor(np.log(2.0), dtype=torch.float32))
    torch.testing.assert_close(terms["image"], torch.tensor(np.log(2.0), dtype=torch.float32))
    torch.testing.assert_close(loss, torch.tensor(1.5 * np.log(2.0), dtype=torch.float32))
    loss0, terms0 = stage1_loss(out, _batch(scribble, [True, True, False]), dense_weight=0.0)
    assert "dense" not in terms0 and torch.equal(loss0, terms["image"])


def test_present_restriction_zeroes_absent_classes_everywhere():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 5, output_stride=16, method="dense").eval()
    images = torch.randn(2, 3, 32, 32)
    present = torch.tensor([[True, False, True, False, False], [True, True, False, False, True]])
    probs = dense_probs(model, images, present, scales=(1.0, 1.5))
    assert probs.shape == (2, 5, 32, 32)
    assert (probs[~present] == 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 32))
    masked = restrict_to_present(torch.zeros(1, 3, 2, 2), torch.tensor([[True, False, True]])).softmax(1)
    torch.testing.assert_close(masked[0, :, 0, 0], torch.tensor([0.5, 0.0, 0.5]))


def test_refinement_keeps_every_scribble_and_never_adds_an_absent_class():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((3, 20, 20)).astype(np.float32))
    probs = torch.zeros(5, 20, 20)
    probs[0], probs[3] = 0.3, 0.7  # present: background and class 3
    scribble = torch.full((20, 20), 255)
    scribble[5, 2:9] = 3
    scribble[15, 10:18] = 0  # a background stroke where the maps say class 3
    s1 = Stage1Spec(rw_beta=4.0, rw_prior_weight=0.05)
    refined = refine(image, probs, scribble, s1)
    assert (refined[[1, 2, 4]] == 0).all()
    torch.testing.assert_close(refined.sum(0), torch.ones(20, 20), rtol=0, atol=1e-6)
    label = pseudo_label(refined, scribble)
    scribbled = scribble != 255
    assert torch.equal(label[scribbled], scribble[scribbled].to(torch.uint8))
    assert set(label.unique().tolist()) <= {0, 3}


def test_a_scribbled_class_whose_prior_is_zero_still_spreads_from_its_seeds():
    """A CAM can be zero everywhere for a scribbled class; the walk keeps that class (it used to drop
    it, leaving the class on its scribble pixels alone)."""
    image = torch.full((3, 12, 12), 0.5)  # flat: every edge alike
    probs = torch.zeros(3, 12, 12)
    probs[0] = 1.0  # the prior knows background only
    scribble = torch.full((12, 12), 255)
    scribble[2:4, 2:4] = 2  # class 2 scribbled, 4 pixels, zero prior
    scribble[10, 10] = 0
    refined = refine(image, probs, scribble, Stage1Spec(rw_beta=4.0, rw_prior_weight=1e-3))
    label = pseudo_label(refined, scribble)
    assert int((label == 2).sum()) > 4 * 4  # spread well beyond its 4 seed pixels
    assert (refined[1] == 0).all()  # neither scribbled nor in the prior: still absent


def test_label_quality_golden_values():
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    scribble = torch.tensor([[0, 255, 1, 255], [255, 255, 255, 255]])
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # one background pixel wrong
    q = LabelQuality(2)
    q.update(label, scribble, gt)
    s = q.summary()
    # Pseudo-label: background IoU 3/4, class 1 IoU 4/5.
    assert s["pseudo_label_miou"] == pytest.approx(100 * (3 / 4 + 4 / 5) / 2)
    # Trivial: background everywhere but the scribbled class-1 pixel: bg IoU 4/7, class 1 IoU 1/4.
    assert s["trivial_label_miou"] == pytest.approx(100 * (4 / 7 + 1 / 4) / 2)
    # Unscribbled pixels (6): the pseudo-label gets bg 2/3 and class 1 3/4; trivial bg 3/6, class 1 0.
    assert s["pseudo_label_unscribbled_miou"] == pytest.approx(100 * (2 / 3 + 3 / 4) / 2)
    assert s["trivial_label_unscribbled_miou"] == pytest.approx(100 * (3 / 6 + 0) / 2)


def test_f1_per_class_golden_values_and_a_class_absent_from_the_split():
    predicted = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    f1 = f1_per_class(predicted, targets)
    # Class 0: tp 1, 2 predicted, 1 present -> 2/3; class 1: tp 2 of 2 and 2 -> 1; class 2: undefined.
    assert f1[:2].tolist() == pytest.approx([2 / 3, 1.0]) and math.isnan(f1[2])
    assert float(f1.nanmean()) == pytest.approx((2 / 3 + 1) / 2)  # a perfect class 1 is not dragged by 2


def test_average_precision_golden_values():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.05]])
    targets = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    ap = average_precision(scores, targets)
    # Column 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2. Column 1: the single hit ranks first -> 1.
    torch.testing.assert_close(ap, torch.tensor([(1 + 2 / 3) / 2, 1.0], dtype=torch.float64))
    assert torch.isnan(average_precision(scores[:, :1], torch.zeros(4, 1)))[0]


def test_pseudo_label_pass_is_deterministic(tmp_path):
    root = tmp_path / "toy"
    ids, _ = squares_dataset(root, count=6)
    spec = ExperimentSpec.model_validate(
        {"data": {"root": str(root), "num_classes": 3, "loader_workers": 0},
         "stage1": {"backbone": "resnet18", "output_stride": 16, "cam_scales": [1.0, 1.5]}}
    )  # fmt: skip
    assert spec.stage1.method == "dense" and spec.stage1.refine == "random_walk"  # the defaults
    torch.manual_seed(0)
    model = build_classifier("resnet18", 3, 16, method="dense")
    outputs = []
    for name in ("a", "b"):
        quality, _ = generate_pseudo_labels(
            model, spec, Runner(run=str(tmp_path)), scribble_dir=root / "pascal_2012_scribble", out_dir=tmp_path / name
        )
        outputs.append([(tmp_path / name / f"{i}.png").read_bytes() for i in ids])
        assert quality is not None
    assert outputs[0] == outputs[1]


def test_background_bias_golden_values():
    """The background's probability is scaled before the argmax; scribbled pixels keep their class."""
    probs = torch.tensor([[[0.40, 0.30, 0.10]], [[0.60, 0.70, 0.90]]])  # (K=2, 1, 3)
    unscribbled = torch.full((1, 3), 255, dtype=torch.uint8)
    assert pseudo_label(probs, unscribbled).tolist() == [[1, 1, 1]]
    assert pseudo_label(probs, unscribbled, background_bias=2.0).tolist() == [[0, 1, 1]]  # 0.8 > 0.6, 0.6 < 0.7
    scribbled = torch.tensor([[1, 255, 255]], dtype=torch.uint8)
    assert pseudo_label(probs, scribbled, background_bias=10.0).tolist() == [[1, 0, 0]]
