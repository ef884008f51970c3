"""Multi-label classifier of stage 1 and its class activation maps (Eq. 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core.models.backbones import ResNetBackbone


class CAMClassifier(nn.Module):
    """ResNet, global average pooling and a bias-free linear layer over the K-1 foreground classes."""

    def __init__(self, backbone: ResNetBackbone, num_foreground: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.out_channels, num_foreground, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, feats = self.backbone(images)  # (B, C, h, w)
        return self.classifier(feats.mean(dim=(2, 3)))  # (B, K-1) multi-label logits

    def cams(self, images: torch.Tensor) -> torch.Tensor:
        """CAM_k = ReLU(sum_c W_kc F_c) on the last feature map (Eq. 6): (B, K-1, h, w)."""
        _, feats = self.backbone(images)
        weight = self.classifier.weight[:, :, None, None]  # (K-1, C, 1, 1)
        return F.relu(F.conv2d(feats, weight))
