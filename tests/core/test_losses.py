"""Losses (Eq. 8, 9, 13, 15, 17): hand-computed values, ignore handling, resizing, purity."""

import math

import pytest
import torch
import torch.nn.functional as F

from cdsp_core.losses import LossConfig, cdsp_loss, distance_entropy, lorm_loss, partial_ce, smoothed_ce

K = 5


def labels(h=4, w=6, value=1):
    return torch.full((2, h, w), value, dtype=torch.long)


def test_uniform_logits_give_log_k():
    logits = torch.zeros(2, K, 4, 6)
    assert partial_ce(logits, labels()).item() == pytest.approx(math.log(K))
    assert smoothed_ce(logits, labels(), 0.1).item() == pytest.approx(math.log(K))
    assert distance_entropy(logits, torch.full((2, 4, 6), 255, dtype=torch.uint8)).item() == pytest.approx(math.log(K))


def test_cross_entropy_golden_values():
    # One pixel, two classes, p = (1/4, 3/4).
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    y = torch.tensor([[[1]]])
    assert partial_ce(logits, y).item() == pytest.approx(-math.log(0.75))
    eps = 0.1
    expected = (1 - eps) * -math.log(0.75) + eps * -(math.log(0.25) + math.log(0.75)) / 2
    assert smoothed_ce(logits, y, eps).item() == pytest.approx(expected)


def test_partial_ce_averages_over_labelled_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(1, K, 3, 3)
    y = torch.full((1, 3, 3), 255, dtype=torch.long)
    y[0, 0, 0], y[0, 2, 1] = 2, 0
    logp = F.log_softmax(logits, 1)
    expected = -(logp[0, 2, 0, 0] + logp[0, 0, 2, 1]) / 2
    assert partial_ce(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_nothing_labelled_gives_zero_with_a_graph():
    logits = torch.randn(1, K, 3, 3, requires_grad=True)
    y = torch.full((1, 3, 3), 255, dtype=torch.long)
    for loss in (partial_ce(logits, y), smoothed_ce(logits, y)):
        assert loss.item() == 0.0
        loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


def test_logits_are_upsampled_bilinearly_with_align_corners():
    torch.manual_seed(1)
    small = torch.randn(2, K, 5, 7)
    y = torch.randint(0, K, (2, 9, 13))
    y[0, :2] = 255
    big = F.interpolate(small, size=(9, 13), mode="bilinear", align_corners=True)
    assert partial_ce(small, y).item() == pytest.approx(F.cross_entropy(big, y, ignore_index=255).item(), rel=1e-6)
    d = torch.randint(0, 256, (2, 9, 13), dtype=torch.uint8)
    assert distance_entropy(small, d).item() == pytest.approx(distance_entropy(big, d).item(), rel=1e-6)


def test_distance_entropy_weights_and_counts_nonzero_pixels():
    logits = torch.zeros(1, K, 2, 2)
    d = torch.tensor([[[255, 0], [0, 0]]], dtype=torch.uint8)
    # One non-zero pixel with weight 1: the mean is over that pixel only.
    assert distance_entropy(logits, d).item() == pytest.approx(math.log(K))
    half = torch.full((1, 2, 2), 127.5)
    assert distance_entropy(logits, half).item() == pytest.approx(0.5 * math.log(K))
    assert distance_entropy(logits, torch.zeros(1, 2, 2)).item() == 0.0
    # Hand-computed two-pixel case with different entropies and weights.
    # Pixel 0 uniform, pixel 1 with p = (1/4, 3/4).
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 2)
    d = torch.tensor([[[255.0, 51.0]]])
    h0 = math.log(2.0)
    h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert distance_entropy(logits, d).item() == pytest.approx((1.0 * h0 + 0.2 * h1) / 2)


def test_distance_entropy_is_positive_and_small_when_confident():
    logits = torch.zeros(1, K, 3, 3)
    logits[:, 1] = 20.0
    value = distance_entropy(logits, torch.full((1, 3, 3), 255, dtype=torch.uint8)).item()
    assert 0 < value < 1e-6


def test_lorm_loss_golden_and_gradients_to_both_inputs():
    f = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    r = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    loss = lorm_loss(f, r)
    assert loss.item() == pytest.approx((0 + 4 + 9) / 2)  # zero difference is not counted
    loss.backward()
    assert f.grad is not None and r.grad is not None
    torch.testing.assert_close(f.grad, torch.tensor([0.0, 2.0, 3.0]))
    torch.testing.assert_close(r.grad, -f.grad)
    assert lorm_loss(torch.ones(3), torch.ones(3)).item() == 0.0


def test_losses_never_modify_inputs():
    torch.manual_seed(2)
    logits = torch.randn(2, K, 4, 4)
    y = torch.randint(0, K, (2, 8, 8))
    y[:, 0] = 255
    d = torch.randint(0, 256, (2, 8, 8), dtype=torch.uint8)
    f, r = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2)
    copies = [t.clone() for t in (logits, y, d, f, r)]
    partial_ce(logits, y)
    smoothed_ce(logits, y)
    distance_entropy(logits, d)
    lorm_loss(f, r)
    cdsp_loss(LossConfig(), logits, y, y, d, d, f, r)
    for before, after in zip(copies, (logits, y, d, f, r), strict=True):
        assert torch.equal(before, after)


def test_cdsp_loss_is_the_weighted_sum_of_active_terms():
    torch.manual_seed(3)
    logits = torch.randn(2, K, 4, 4, requires_grad=True)
    s = torch.randint(0, K, (2, 4, 4))
    p = torch.randint(0, K, (2, 4, 4))
    d_s = torch.randint(0, 256, (2, 4, 4), dtype=torch.uint8)
    d_c = torch.randint(0, 256, (2, 4, 4), dtype=torch.uint8)
    f, r = torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2)
    cfg = LossConfig(segs=1.0, segc=0.5, ds=2.0, dc=0.0, lorm=3.0)
    total, terms = cdsp_loss(cfg, logits, s, p, d_s, d_c, f, r)
    assert set(terms) == {"segs", "segc", "ds", "lorm"}
    expected = (
        partial_ce(logits, s)
        + 0.5 * smoothed_ce(logits, p)
        + 2.0 * distance_entropy(logits, d_s)
        + 3.0 * lorm_loss(f, r)
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_cdsp_loss_names_a_missing_input():
    with pytest.raises(ValueError, match="pseudo"):
        cdsp_loss(LossConfig(), torch.zeros(1, K, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
