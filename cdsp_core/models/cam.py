"""Stage-1 models: the paper's multi-label CAM classifier (Eq. 6) and our dense class-map classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core.models.backbones import ResNetBackbone
from cdsp_core.models.deeplab import conv_bn_relu


class CAMClassifier(nn.Module):
    """ResNet, global average pooling and a bias-free linear layer over the K-1 foreground classes."""

    def __init__(self, backbone: ResNetBackbone, num_foreground: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_channels, num_foreground, bias=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _, feats = self.backbone(images)  # (B, C, h, w)
        return {"logits": self.classifier(feats.mean(dim=(2, 3)))}  # (B, K-1) multi-label logits

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """CAM_k = ReLU(sum_c W_kc F_c) on the last feature map (Eq. 6): (B, K-1, h, w)."""
        _, feats = self.backbone(images)
        weight = self.classifier.weight[:, :, None, None]  # (K-1, C, 1, 1)
        return F.relu(F.conv2d(feats, weight))


LSE_R = 4.0
"""Sharpness of the log-sum-exp pooling of the dense maps (0 would be the mean, infinity the max)."""


def lse_pool(maps: torch.Tensor, r: float) -> torch.Tensor:
    """(B, C, h, w) -> (B, C): (1/r) log mean_i exp(r z_i), a smooth maximum over positions.

    The mean (a CAM's pooling) would push every pixel's score up by the same amount to raise an
    image's logit, background pixels included; this pooling pushes mostly where the class already
    scores high, so the image-level loss does not swell the objects over the background.
    """
    flat = maps.float().flatten(2)
    return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[-1])) / r


class DenseClassifier(nn.Module):
    """Class maps over all K classes, background included, at stride 4, from which the image is classified.

    A light decoder (the last features reduced and upsampled onto 48-channel stride-4 features, two
    3x3 convs) ends in a bias-free 1x1 conv to K maps: channel 0 is background. The image-level
    logit of foreground class k pools its map (`lse_pool`), so the multi-label loss trains the maps
    as it trains a CAM; the scribbles supervise the same maps densely through a softmax over the
    classes present.
    """

    def __init__(self, backbone: ResNetBackbone, num_classes: int, channels: int = 128):
        super().__init__()
        self.backbone = backbone
        self.reduce_high = conv_bn_relu(backbone.out_channels, channels, 1)
        self.reduce_low = conv_bn_relu(backbone.low_channels, 48, 1)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=False)

    def maps(self, images: torch.Tensor) -> torch.Tensor:
        """Class-map logits (B, K, H/4, W/4); channel 0 is background."""
        low, high = self.backbone(images)
        x = F.interpolate(self.reduce_high(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([x, self.reduce_low(low)], dim=1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.maps(images)
        return {"maps": maps, "logits": lse_pool(maps[:, 1:], LSE_R)}  # logits: (B, K-1) multi-label
