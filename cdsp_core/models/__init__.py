"""Model builders: plain functions over plain dicts, failing with the list of valid names."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from cdsp_core.models.backbones import BACKBONES, ResNetBackbone, build_backbone
from cdsp_core.models.cam import CAMClassifier, DenseClassifier
from cdsp_core.models.deeplab import (
    DeepLabV2ConcatHead,
    DeepLabV2Head,
    DeepLabV3PlusHead,
    Segmentor,
    default_rates,
    scaled_rates,
)
from cdsp_core.models.lorm import LoRM, foreground_mask, rectify

SEGMENTORS = ("deeplabv2", "deeplabv3plus")
HEAD_FORMS = ("textbook", "official")


def build_segmentor(
    segmentor: str,
    backbone: str,
    num_classes: int,
    output_stride: int = 8,
    pretrained: str = "none",
    lorm: bool = True,
    lorm_mask: str = "query",
    head_form: str = "textbook",
    rates: Sequence[int] | None = None,
    lorm_temperature: float = 1.0,
) -> Segmentor:
    """DeepLabV2 or DeepLabV3+ on a ResNet, with LoRM on layer4 when `lorm` is on.

    `head_form` picks the textbook heads or the official code's (with layer4's multi-grid);
    `rates` are the ASPP's 3x3 rates (default: the form's, for a 465 px crop).
    """
    if head_form not in HEAD_FORMS:
        raise ValueError(f"unknown head form {head_form!r}; valid: {list(HEAD_FORMS)}")
    official = head_form == "official"
    trunk = build_backbone(backbone, output_stride, pretrained, multi_grid=official)
    rates = tuple(rates) if rates is not None else default_rates(segmentor, head_form, output_stride)
    head: nn.Module
    if segmentor == "deeplabv2":
        head = (DeepLabV2ConcatHead if official else DeepLabV2Head)(trunk.out_channels, num_classes, rates)
    elif segmentor == "deeplabv3plus":
        head = DeepLabV3PlusHead(trunk.out_channels, trunk.low_channels, num_classes, rates, official)
    else:
        raise ValueError(f"unknown segmentor {segmentor!r}; valid: {list(SEGMENTORS)}")
    module = LoRM(trunk.out_channels, lorm_mask, lorm_temperature) if lorm else None  # type: ignore[arg-type]
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
    "HEAD_FORMS",
    "SEGMENTORS",
    "STAGE1_METHODS",
    "CAMClassifier",
    "DeepLabV2ConcatHead",
    "DeepLabV2Head",
    "DeepLabV3PlusHead",
    "DenseClassifier",
    "LoRM",
    "ResNetBackbone",
    "Segmentor",
    "build_backbone",
    "build_classifier",
    "build_segmentor",
    "default_rates",
    "foreground_mask",
    "rectify",
    "scaled_rates",
]
