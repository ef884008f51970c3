"""Model builders: plain functions over plain dicts, failing with the list of valid names."""

from __future__ import annotations

from torch import nn

from cdsp_core.models.backbones import BACKBONES, ResNetBackbone, build_backbone
from cdsp_core.models.cam import CAMClassifier
from cdsp_core.models.deeplab import DeepLabV2Head, DeepLabV3PlusHead, Segmentor
from cdsp_core.models.lorm import LoRM, foreground_mask, rectify

SEGMENTORS = ("deeplabv2", "deeplabv3plus")


def build_segmentor(
    segmentor: str,
    backbone: str,
    num_classes: int,
    output_stride: int = 8,
    pretrained: str = "none",
    lorm: bool = True,
    lorm_mask: str = "query",
) -> Segmentor:
    """DeepLabV2 or DeepLabV3+ on a ResNet, with LoRM on layer4 when `lorm` is on."""
    trunk = build_backbone(backbone, output_stride, pretrained)
    head: nn.Module
    if segmentor == "deeplabv2":
        head = DeepLabV2Head(trunk.out_channels, num_classes)
    elif segmentor == "deeplabv3plus":
        head = DeepLabV3PlusHead(trunk.out_channels, trunk.low_channels, num_classes, output_stride)
    else:
        raise ValueError(f"unknown segmentor {segmentor!r}; valid: {list(SEGMENTORS)}")
    module = LoRM(trunk.out_channels, mask_on=lorm_mask) if lorm else None  # type: ignore[arg-type]
    return Segmentor(trunk, head, num_classes, module)


def build_classifier(
    backbone: str, num_classes: int, output_stride: int = 16, pretrained: str = "none"
) -> CAMClassifier:
    """The stage-1 CAM classifier over the K-1 foreground classes."""
    return CAMClassifier(build_backbone(backbone, output_stride, pretrained), num_classes - 1)


__all__ = [
    "BACKBONES",
    "SEGMENTORS",
    "CAMClassifier",
    "DeepLabV2Head",
    "DeepLabV3PlusHead",
    "LoRM",
    "ResNetBackbone",
    "Segmentor",
    "build_backbone",
    "build_classifier",
    "build_segmentor",
    "foreground_mask",
    "rectify",
]
