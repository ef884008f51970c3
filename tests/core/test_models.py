"""Models: every backbone x head (shape, no NaN, every parameter gets a gradient), CAMs, weights."""

import math

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from cdsp_core.losses import lorm_loss
from cdsp_core.models import (
    BACKBONES,
    HEAD_FORMS,
    SEGMENTORS,
    build_backbone,
    build_classifier,
    build_segmentor,
    default_rates,
    scaled_rates,
)
from cdsp_core.models.backbones import imagenet_weights_path
from cdsp_core.models.cam import LSE_R, lse_pool
from cdsp_core.models.deeplab import ASPP, DeepLabV2ConcatHead, DeepLabV2Head

K = 3


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("segmentor", SEGMENTORS)
@pytest.mark.parametrize("form", HEAD_FORMS)
def test_every_backbone_and_head_trains(segmentor, backbone, form):
    torch.manual_seed(0)
    model = build_segmentor(segmentor, backbone, K, output_stride=8, lorm=True, head_form=form, rates=(1, 2, 3))
    model.train()
    images = torch.randn(2, 3, 48, 48)
    pseudo = torch.randint(0, K, (2, 48, 48))
    out = model(images, pseudo)
    stride = 8 if segmentor == "deeplabv2" else 4
    assert out["logits"].shape == (2, K, 48 // stride, 48 // stride)
    assert out["features"].shape[-2:] == (6, 6) and out["rectified"].shape == out["features"].shape
    assert all(torch.isfinite(v).all() for v in out.values())
    loss = out["logits"].square().mean() + lorm_loss(out["features"], out["rectified"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride(backbone, output_stride):
    trunk = build_backbone(backbone, output_stride).eval()
    with torch.no_grad():
        low, high = trunk(torch.randn(1, 3, 64, 64))
    assert low.shape[-2:] == (16, 16)
    assert high.shape[-2:] == (64 // output_stride, 64 // output_stride)
    assert high.shape[1] == trunk.out_channels == (512 if backbone == "resnet18" else 2048)


def test_inference_skips_lorm():
    model = build_segmentor("deeplabv3plus", "resnet18", K).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.ones(1, 32, 32, dtype=torch.long))
    assert set(out) == {"logits"}


def test_cam_is_the_classifier_applied_per_position():
    torch.manual_seed(1)
    clf = build_classifier("resnet18", 4, output_stride=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = clf.backbone(x)
        raw = torch.einsum("kc,bchw->bkhw", clf.classifier.weight, feats)
        torch.testing.assert_close(clf.cams(x), raw.clamp(min=0))
        # GAP then linear == linear then GAP (Eq. 6 is the classifier read out per position).
        torch.testing.assert_close(clf(x)["logits"], raw.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    assert clf.classifier.bias is None and clf.classifier.out_features == 3


def test_dense_maps_have_a_background_channel_and_classify_by_their_mean():
    torch.manual_seed(1)
    clf = build_classifier("resnet18", 4, output_stride=16, method="dense").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = clf(x)
        torch.testing.assert_close(out["maps"], clf.maps(x))
    assert out["maps"].shape == (2, 4, 16, 16)  # all K classes, background first, at stride 4
    torch.testing.assert_close(out["logits"], lse_pool(out["maps"][:, 1:], LSE_R))


def test_lse_pool_lies_between_the_mean_and_the_max():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # (1, 1, 2, 2)
    golden = math.log((1 + math.e**4 + math.e**8 + math.e**20) / 4) / 4
    torch.testing.assert_close(lse_pool(maps, 4.0), torch.tensor([[golden]]))
    assert 2.0 < golden < 5.0  # mean 2, max 5
    torch.testing.assert_close(lse_pool(maps, 1e-4), torch.tensor([[2.0]]), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match=r"unknown stage-1 method 'crf'; valid: \['cam', 'dense'\]"):
        build_classifier("resnet18", 4, method="crf")


def test_weights_from_a_local_file(tmp_path):
    ref = tvm.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    trunk = build_backbone("resnet18", 8, str(path))
    torch.testing.assert_close(trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    torch.save(tvm.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match="do not fit"):
        build_backbone("resnet18", 8, str(tmp_path / "r34.pth"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_backbone("resnet18", 8, str(tmp_path / "missing.pth"))


def test_imagenet_weights_come_from_the_torchvision_cache_never_a_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet18-f37072fd\.pth"):
        build_backbone("resnet18", 8, "imagenet")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    expected.parent.mkdir(parents=True)
    ref = tvm.resnet18(weights=None)
    torch.save(ref.state_dict(), expected)
    assert imagenet_weights_path("resnet18") == expected
    trunk = build_backbone("resnet18", 8, "imagenet")
    torch.testing.assert_close(trunk.stem[0].weight, ref.conv1.weight)


def _dilations(layer: nn.Sequential) -> list[int]:
    """The dilation of each block's last 3x3 conv."""
    return [
        [m for m in b.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][-1].dilation[0] for b in layer
    ]


def test_the_official_heads_are_those_the_papers_code_ran():
    v3 = build_segmentor("deeplabv3plus", "resnet50", 21, 8, head_form="official")
    aspp = v3.head.aspp
    assert isinstance(aspp, ASPP)
    assert [b[0].dilation[0] for b in aspp.branches] == [1, 6, 12, 18]  # a 1x1, then rates 6/12/18 at stride 8
    assert isinstance(aspp.pool[2], nn.BatchNorm2d) and aspp.pool[1].bias is None  # BN after image pooling
    assert aspp.project[1].p == 0.5
    assert _dilations(v3.backbone.layer4) == [4, 8, 16]  # multi-grid (1, 2, 4)
    v2 = build_segmentor("deeplabv2", "resnet50", 21, 8, head_form="official")
    assert isinstance(v2.head, DeepLabV2ConcatHead)
    aspp = v2.head.aspp
    assert [b[0].dilation[0] for b in aspp.branches] == [1, 12, 18, 24]
    assert all(b[0].out_channels == 21 and isinstance(b[1], nn.BatchNorm2d) for b in aspp.branches)  # K wide
    project = list(aspp.project)
    assert project[0].in_channels == 5 * 21 and project[0].out_channels == 21
    assert isinstance(project[-1], nn.BatchNorm2d)  # logits: no ReLU after the projection
    # The textbook forms, for comparison.
    text = build_segmentor("deeplabv3plus", "resnet50", 21, 8)
    assert [b[0].dilation[0] for b in text.head.aspp.branches] == [1, 12, 24, 36]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in text.head.aspp.pool) and text.head.aspp.project[1].p == 0.1
    assert _dilations(text.backbone.layer4) == [4, 4, 4]
    assert isinstance(build_segmentor("deeplabv2", "resnet50", 21, 8).head, DeepLabV2Head)


def test_rates_scale_with_the_feature_map():
    assert default_rates("deeplabv3plus", "official", 8) == (6, 12, 18)
    assert default_rates("deeplabv3plus", "textbook", 16) == (6, 12, 18)
    assert scaled_rates((6, 12, 18), 465, 8) == (6, 12, 18)  # the reference crop: unchanged
    assert scaled_rates((6, 12, 18), 65, 8) == (1, 2, 3)  # 9x9 features instead of 59x59
    assert scaled_rates((12, 24, 36), 65, 8) == (2, 4, 5)
    assert scaled_rates((6, 12, 18), 65, 16) == (1, 2, 3)  # 5x5 instead of 30x30


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="resnet101"):
        build_backbone("resnet99")
    with pytest.raises(ValueError, match="deeplabv3plus"):
        build_segmentor("unet", "resnet18", K)
    with pytest.raises(ValueError, match="official"):
        build_segmentor("deeplabv2", "resnet18", K, head_form="paper")


def test_sync_batchnorm_only_when_asked_and_distributed():
    from cdsp_core.segmentor import build_stage2_model, sync_batchnorm
    from cdsp_core.spec import validate_spec

    raw = {"data": {"crop_size": 65}, "stage2": {"backbone": "resnet18", "sync_batchnorm": True}}
    spec = validate_spec({**raw, "resources": {"use_gpu": True}})
    model = build_stage2_model(spec)
    assert sync_batchnorm(model, spec, world_size=1) is model  # one worker: nothing to synchronise
    synced = sync_batchnorm(build_stage2_model(spec), spec, world_size=2)
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    plain = validate_spec({**raw, "stage2": {"backbone": "resnet18"}})
    assert nn.SyncBatchNorm not in {type(m) for m in sync_batchnorm(build_stage2_model(plain), plain, 2).modules()}
