"""DeepLab heads in two forms: the textbook ones and those of the paper's official code.

- textbook: DeepLab-v2's sum of dilated 3x3 convs straight to class scores (rates 6/12/18/24);
  DeepLabV3+ with ASPP rates 12/24/36 at output stride 8 (6/12/18 at 16), no BatchNorm after
  image pooling, dropout 0.1.
- official (what produced the paper's tables): DeepLabV3+ with ASPP rates 6/12/18 at output
  stride 8 too, BatchNorm after image pooling and dropout 0.5; its "deeplabv2" is a concatenated
  ASPP straight to class scores: a 1x1 branch, 3x3 branches at 12/18/24 and image pooling, each
  K channels wide with BatchNorm and ReLU, concatenated and projected to K with BatchNorm.

Rates are those of a 465 px crop; `scaled_rates` adapts them to smaller feature maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core.models.backbones import ResNetBackbone
from cdsp_core.models.lorm import LoRM, feature_classes, foreground_mask
from cdsp_core.spec import feature_size

HeadForm = Literal["textbook", "official"]
REFERENCE_CROP = 465
"""The crop the rates are given for (the paper's VOC crop)."""


def default_rates(segmentor: str, form: str, output_stride: int) -> tuple[int, ...]:
    """The 3x3 ASPP rates of a head form, for a 465 px crop."""
    if segmentor == "deeplabv2":
        return (6, 12, 18, 24) if form == "textbook" else (12, 18, 24)
    if form == "textbook" and output_stride == 8:
        return (12, 24, 36)
    return (6, 12, 18)


def scaled_rates(rates: Sequence[int], crop: int, output_stride: int) -> tuple[int, ...]:
    """Rates scaled from a 465 px crop's feature map to this crop's (at least 1): unchanged at 465.

    A 3x3 branch whose rate reaches the feature map's size sees only padding off its centre, i.e. it
    is a 1x1 conv; scaling keeps each branch's field of view the same share of the image.
    """
    ratio = feature_size(crop, output_stride) / feature_size(REFERENCE_CROP, output_stride)
    return tuple(max(1, round(r * ratio)) for r in rates)


class DeepLabV2Head(nn.Module):
    """Textbook DeepLab-v2: a sum of 3x3 dilated convs straight to class scores."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        for conv in self.branches:
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](high)
        for branch in self.branches[1:]:
            out = out + branch(high)
        return out  # (B, K, H/os, W/os)


def conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """A 1x1 branch, dilated 3x3 branches and image pooling, concatenated and projected.

    `pool_norm`: BatchNorm after the pooling branch's conv (official; it needs two images or more
    per worker in training, a 1x1 map having one value per image). `project` is what follows the
    concatenation; by default a 1x1 conv to `channels` with BatchNorm, ReLU and dropout.
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int],
        channels: int = 256,
        pool_norm: bool = False,
        dropout: float = 0.1,
        project: nn.Module | None = None,
    ):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)] + [conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1, bias=not pool_norm)]
        if pool_norm:
            pool.append(nn.BatchNorm2d(channels))
        self.pool = nn.Sequential(*pool, nn.ReLU(inplace=True))
        width = channels * (len(rates) + 2)
        self.project = project or nn.Sequential(conv_bn_relu(width, channels, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.project(torch.cat([*outs, pooled], dim=1))


class DeepLabV2ConcatHead(nn.Module):
    """The official code's "deeplabv2": a concatenated ASPP whose branches are K channels wide,
    projected to the K class scores by a 1x1 conv and BatchNorm (no ReLU: they are logits)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (12, 18, 24)):
        super().__init__()
        width = num_classes * (len(rates) + 2)
        project = nn.Sequential(nn.Conv2d(width, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes))
        self.aspp = ASPP(in_channels, rates, channels=num_classes, pool_norm=True, project=project)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.aspp(high)  # (B, K, H/os, W/os)


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the last features, fused with 48-channel low-level features at stride 4."""

    def __init__(
        self, in_channels: int, low_channels: int, num_classes: int, rates: Sequence[int], official: bool = False
    ):
        super().__init__()
        self.aspp = ASPP(in_channels, rates, pool_norm=official, dropout=0.5 if official else 0.1)
        self.reduce = conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(conv_bn_relu(256 + 48, 256, 3), conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)  # (B, 256, H/os, W/os)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.fuse(torch.cat([x, self.reduce(low)], dim=1))  # (B, 256, H/4, W/4)
        return self.classifier(x)  # (B, K, H/4, W/4)


class Segmentor(nn.Module):
    """Backbone + head, with LoRM on the last feature map during training.

    forward(images, pseudo) returns {"logits"} and, when LoRM is present, the model is training
    and a pseudo-label is given, also {"features", "rectified", "foreground"} for the LoRM loss
    (`foreground`: the pseudo-label's foreground at feature resolution). Inference never runs LoRM.
    """

    def __init__(self, backbone: ResNetBackbone, head: nn.Module, num_classes: int, lorm: LoRM | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.lorm = lorm
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor, pseudo: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        low, high = self.backbone(images)
        out = {"logits": self.head(high, low)}
        if self.lorm is not None and self.training and pseudo is not None:
            size = (high.shape[-2], high.shape[-1])
            mask = foreground_mask(pseudo, size, self.num_classes)
            classes = feature_classes(pseudo, size) if self.lorm.mask_on == "class" else None
            out["features"] = high
            out["rectified"] = self.lorm(high, mask, classes)
            out["foreground"] = mask
        return out

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at `lr`, head and LoRM at `lr * head_lr_mult` (the schedule scales each group's own rate)."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [
            {"params": list(self.backbone.parameters()), "lr": lr},
            {"params": head, "lr": lr * head_lr_mult},
        ]
