"""Model builders: plain functions over plain dicts, failing with the list of valid names."""

from __future__ import annotations

from torch import nn

from cdsp_core.models.backbones import BACKBONES, ResNetBackbone, build_backbone
from cdsp_core.models.cam import CAMClassifier, DenseClassifier
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


STAGE1_METHODS = ("cam", "dense")


def build_classifier(
    backbone: str, num_classes: int, output_stride: int = 16, pretrained: str = "none", method: str = "cam"
) -> CAMClassifier | DenseClassifier:
    """The stage-1 classifier: CAMs over the K-1 foreground classes, or dense maps over all K."""
    if method not in STAGE1_METHODS:
        raise ValueError(f"unknown stage-1 method {method!r}; valid: {list(STAGE1_METHODS)}")
    trunk = build_backbone(backbone, output_stride, pretrained)
    return CAMClassifier(trunk, num_classes - 1) if method == "cam" else DenseClassifier(trunk, num_classes)


__all__ = [
    "BACKBONES",
    "SEGMENTORS",
    "STAGE1_METHODS",
    "CAMClassifier",
    "DeepLabV2Head",
    "DeepLabV3PlusHead",
    "DenseClassifier",
    "LoRM",
    "ResNetBackbone",
    "Segmentor",
    "build_backbone",
    "build_classifier",
    "build_segmentor",
    "foreground_mask",
    "rectify",
]
