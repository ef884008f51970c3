"""DeepLabV2 (ASPP as a sum of dilated 3x3 convs) and DeepLabV3+ (ASPP + low-level decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core.models.backbones import ResNetBackbone
from cdsp_core.models.lorm import LoRM, foreground_mask


class DeepLabV2Head(nn.Module):
    """Sum of four 3x3 dilated convs straight to class scores (rates 6, 12, 18, 24)."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)):
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
    """1x1 + three dilated 3x3 branches + image pooling, concatenated and projected to 256."""

    def __init__(self, in_channels: int, rates: tuple[int, int, int], channels: int = 256):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, channels, 1)] + [conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        )
        # No BatchNorm after pooling: a 1x1 map with one image per worker has a single value per
        # channel, which BatchNorm cannot normalise in training.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(conv_bn_relu(channels * 5, channels, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        return self.project(torch.cat([*outs, pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the last features, fused with 48-channel low-level features at stride 4."""

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, output_stride: int):
        super().__init__()
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        self.aspp = ASPP(in_channels, rates)
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
    and a pseudo-label is given, also {"features", "rectified"} for the LoRM loss. Inference
    never runs LoRM.
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
            mask = foreground_mask(pseudo, tuple(high.shape[-2:]), self.num_classes)
            out["features"] = high
            out["rectified"] = self.lorm(high, mask)
        return out

    def param_groups(self, lr: float, head_lr_mult: float) -> list[dict]:
        """Backbone at `lr`, head and LoRM at `lr * head_lr_mult` (each group keeps its base)."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "base_lr": lr},
            {"params": head, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult},
        ]
