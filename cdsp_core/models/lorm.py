"""Localization rectification module (LoRM, Eq. 10-13).

F_hat_i = delta * M_i * sum_j A_ij F_j with A = softmax_j(cos(Q_i, K_j)): attention with
unit-normalised queries and keys, scale 1 and V = F. `scaled_dot_product_attention` computes it
without materialising the (hw x hw) matrix wherever a fused kernel applies.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

MaskOn = Literal["query", "key"]


def rectify(
    features: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    fg_mask: torch.Tensor,
    delta: torch.Tensor | float,
    mask_on: MaskOn = "query",
) -> torch.Tensor:
    """Rectified features F_hat (B, C, h, w) from F, the projections Q, K (B, C, h, w) and M (B, h, w).

    mask_on="query" (the official code): background query rows give F_hat = 0.
    mask_on="key" (the paper's Eq. 11 prose): background keys are zeroed in A after the softmax.
    """
    if mask_on not in ("query", "key"):
        raise ValueError(f"mask_on must be 'query' or 'key', got {mask_on!r}")
    b, c, h, w = features.shape
    if fg_mask.shape != (b, h, w):
        raise ValueError(f"fg_mask must be (B, h, w) = {(b, h, w)}, got {tuple(fg_mask.shape)}")
    q = F.normalize(query.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, C), unit rows
    k = F.normalize(key.flatten(2).transpose(1, 2), dim=-1)  # (B, hw, C)
    v = features.flatten(2).transpose(1, 2)  # (B, hw, C)
    m = fg_mask.reshape(b, h * w, 1).to(v.dtype)  # (B, hw, 1)
    if mask_on == "key":
        # A'_ij = M_j A_ij, so sum_j A'_ij F_j = sum_j A_ij (M_j F_j).
        v = v * m
    # One head of width C; scale 1 because q and k are already unit vectors (cosine scores).
    out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
    out = out.squeeze(1)  # (B, hw, C)
    if mask_on == "query":
        out = out * m
    out = delta * out
    return out.transpose(1, 2).reshape(b, c, h, w)


def foreground_mask(pseudo: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The pseudo-label's foreground at feature resolution (B, h, w), bool.

    Bilinear resize (align_corners=True) of the foreground indicator, then > 0; 255 counts as 0.
    Equal to resizing the label values themselves and thresholding at 0.
    """
    fg = ((pseudo >= 1) & (pseudo < num_classes)).float().unsqueeze(1)  # (B, 1, H, W)
    return F.interpolate(fg, size=size, mode="bilinear", align_corners=True).squeeze(1) > 0


class LoRM(nn.Module):
    """Two 1x1 projections (with bias) and the learnable scale delta (init 1)."""

    def __init__(self, channels: int, mask_on: MaskOn = "query"):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.key_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.delta = nn.Parameter(torch.ones(()))
        self.mask_on: MaskOn = mask_on

    def forward(self, features: torch.Tensor, fg_mask: torch.Tensor) -> torch.Tensor:
        return rectify(
            features,
            self.query_conv(features),
            self.key_conv(features),
            fg_mask,
            self.delta,
            self.mask_on,
        )
