"""LoRM (Eq. 10-13): the fused implementation against an explicit float64 one, values and gradients."""

import pytest
import torch

from cdsp_core.models.lorm import LoRM, feature_classes, foreground_mask, rectify


def explicit_rectify(f, q, k, mask, delta, mask_on, classes=None, temperature=1.0):
    """Eq. 10-12 written out with the (hw x hw) matrix, as DESIGN section 4 states them (plus the
    study's options: a per-class key mask and a temperature)."""
    b, c, h, w = f.shape
    Q = q.reshape(b, c, h * w)  # (B, C, hw)
    Kf = k.reshape(b, c, h * w)
    F_ = f.reshape(b, c, h * w)
    M = mask.reshape(b, h * w).to(f.dtype)
    norms = Q.norm(dim=1).unsqueeze(2) * Kf.norm(dim=1).unsqueeze(1)  # (B, hw, hw): |Q_i| |K_j|
    scores = torch.einsum("bci,bcj->bij", Q, Kf) / norms / temperature
    if mask_on == "class":
        ids = classes.reshape(b, h * w)
        scores = scores.masked_fill(ids.unsqueeze(2) != ids.unsqueeze(1), float("-inf"))
    A = torch.softmax(scores, dim=2)  # rows = queries i
    if mask_on == "key":
        A = A * M.unsqueeze(1)  # A'_ij = M_j A_ij
    out = torch.einsum("bij,bcj->bci", A, F_)  # sum_j A_ij F_j
    if mask_on in ("query", "class"):
        out = out * M.unsqueeze(1)
    return (delta * out).reshape(b, c, h, w)


@pytest.mark.parametrize(
    ("mask_on", "temperature"), [("query", 1.0), ("key", 1.0), ("class", 1.0), ("query", 0.25), ("class", 0.5)]
)
def test_rectify_matches_explicit_float64_values_and_gradients(mask_on, temperature):
    torch.manual_seed(0)
    b, c, h, w = 2, 6, 3, 4
    f = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    delta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    classes = torch.randint(0, 3, (b, h, w))
    mask = classes > 0
    mask[1] = False  # an image with no foreground at all
    mask[1, 0, 0] = True
    ours = rectify(f, q, k, mask, delta, mask_on, classes=classes, temperature=temperature)
    ref = explicit_rectify(f, q, k, mask, delta, mask_on, classes, temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * weights).sum(), (f, q, k, delta))
    g_ref = torch.autograd.grad((ref * weights).sum(), (f, q, k, delta))
    for a, e in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_query_mask_zeroes_background_rows_and_key_mask_keeps_them():
    torch.manual_seed(1)
    f, q, k = (torch.randn(1, 4, 2, 2, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[[True, False], [False, False]]])
    rq = rectify(f, q, k, mask, 1.0, "query")
    assert (rq[0, :, 0, 1] == 0).all() and (rq[0, :, 1, :] == 0).all() and rq[0, :, 0, 0].abs().sum() > 0
    rk = rectify(f, q, k, mask, 1.0, "key")
    # Key masking: every output is a weighted copy of the single foreground feature F_(0,0).
    ratio = rk[0].reshape(4, 4) / f[0, :, 0, 0].unsqueeze(1)
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))


def test_class_mask_keeps_each_class_to_itself():
    torch.manual_seed(2)
    f, q, k = (torch.randn(1, 4, 1, 3, dtype=torch.float64) for _ in range(3))
    classes = torch.tensor([[[1, 2, 1]]])
    out = rectify(f, q, k, classes > 0, 1.0, "class", classes=classes)
    torch.testing.assert_close(out[0, :, 0, 1], f[0, :, 0, 1])  # alone in its class: attends to itself only
    # The two class-1 positions mix only each other's features.
    both = f[0, :, 0, [0, 2]]  # (C, 2)
    for pos in (0, 2):
        weights = torch.linalg.lstsq(both, out[0, :, 0, pos].unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="classes"):
        rectify(f, q, k, classes > 0, 1.0, "class")


def test_feature_classes_sample_the_pixel_each_feature_is_centred_on():
    label = torch.arange(65).repeat(65, 1)[None] % 7  # label = column index mod 7
    label[0, 0, 8] = 255
    sampled = feature_classes(label, (9, 9))
    assert sampled[0, 1].tolist() == [(8 * j) % 7 for j in range(9)]  # columns 0, 8, ..., 64
    assert sampled[0, 0, 1] == 0  # 255 counts as background


def test_lorm_loss_rows_and_warm_up_scale():
    from cdsp_core.losses import LossConfig, cdsp_loss, lorm_loss

    f = torch.ones(1, 2, 1, 2)
    rect = torch.tensor([[[[0.0, 1.0]], [[0.0, 1.0]]]])  # position 0 rectified to 0 (a background row)
    assert lorm_loss(f, rect) == 1.0  # two non-zero squares of 1, mean 1
    assert lorm_loss(f, rect, rows=torch.tensor([[[False, True]]])) == 0.0  # only the foreground row
    logits = torch.zeros(1, 2, 1, 2)
    scribble = torch.tensor([[[0, 255]]])
    cfg = LossConfig(segs=1.0, segc=0.0, ds=0.0, dc=0.0, lorm=2.0)
    full, _ = cdsp_loss(cfg, logits, scribble, features=f, rectified=rect)
    half, _ = cdsp_loss(cfg, logits, scribble, features=f, rectified=rect, lorm_scale=0.25)
    torch.testing.assert_close(full - half, torch.tensor(2.0 * 0.75))  # only the LoRM term scaled
    fg_only = LossConfig(segs=1.0, segc=0.0, ds=0.0, dc=0.0, lorm=2.0, lorm_background_rows=False)
    with pytest.raises(ValueError, match="foreground"):
        cdsp_loss(fg_only, logits, scribble, features=f, rectified=rect)


def test_rectify_validates_arguments():
    f = torch.randn(1, 2, 2, 2)
    with pytest.raises(ValueError, match="mask_on"):
        rectify(f, f, f, torch.ones(1, 2, 2, dtype=torch.bool), 1.0, "both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fg_mask"):
        rectify(f, f, f, torch.ones(1, 3, 3, dtype=torch.bool), 1.0)


def test_foreground_mask_resizes_with_align_corners_and_ignores_255():
    # 4x4 -> 2x2 with align_corners=True samples the four corners exactly.
    label = torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 2]]])
    assert foreground_mask(label, (2, 2), 3).tolist() == [[[True, False], [False, True]]]
    # 4x4 -> 3x3 samples at 0, 1.5, 3: the middle row/column mixes input rows/columns 1 and 2,
    # the last ones sample row/column 3 exactly.
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, 2, 2] = 1
    m = foreground_mask(label, (3, 3), 3)
    assert m.tolist() == [[[False, False, False], [False, True, False], [False, False, False]]]
    label[0, 3, 1] = 2  # reaches output (2, 1), sampled at (3, 1.5), and nothing else
    m = foreground_mask(label, (3, 3), 3)
    assert m.tolist() == [[[False, False, False], [False, True, False], [False, True, False]]]
    label[0, 3, 1] = 0
    label[0, 2, 2] = 255
    assert not foreground_mask(label, (3, 3), 3).any()


def test_lorm_module_parts_and_init():
    m = LoRM(8)
    assert m.delta.item() == 1.0 and m.delta.requires_grad
    assert m.query_conv.kernel_size == (1, 1) and m.query_conv.bias is not None
    assert m.key_conv.out_channels == 8 and m.key_conv.bias is not None
    f = torch.randn(2, 8, 3, 3)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    out = m(f, mask)
    assert out.shape == f.shape
    expected = rectify(f, m.query_conv(f), m.key_conv(f), mask, m.delta, "query")
    torch.testing.assert_close(out, expected)
