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

MaskOn = Literal["query", "key", "class"]


def rectify(
    features: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    fg_mask: torch.Tensor,
    delta: torch.Tensor | float,
    mask_on: MaskOn = "query",
    *,
    classes: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Rectified features F_hat (B, C, h, w) from F, the projections Q, K (B, C, h, w) and M (B, h, w).

    mask_on="query" (the official code): background query rows give F_hat = 0.
    mask_on="key" (the paper's Eq. 11 prose): background keys are zeroed in A after the softmax.
    mask_on="class": as "query", and each query attends only to the keys of its own pseudo-class
    (`classes`, (B, h, w) class ids at feature resolution), so that one image's objects of different
    classes are not averaged together.
    `temperature` divides the cosine scores before the softmax (1: the paper's).
    """
    if mask_on not in ("query", "key", "class"):
        raise ValueError(f"mask_on must be 'query', 'key' or 'class', got {mask_on!r}")
    b, c, h, w = features.shape
    if fg_mask.shape != (b, h, w):
        raise ValueError(f"fg_mask must be (B, h, w) = {(b, h, w)}, got {tuple(fg_mask.shape)}")
    attn_mask = None
    if mask_on == "class":
        if classes is None or classes.shape != (b, h, w):
            raise ValueError(f"mask_on='class' needs classes of shape (B, h, w) = {(b, h, w)}")
        ids = classes.reshape(b, 1, h * w)
        attn_mask = (ids.transpose(1, 2) == ids).unsqueeze(1)  # (B, 1, hw, hw): never empty, i == i
    # (B, hw, C) with unit rows, each row contiguous: the fused kernels refuse a last dimension of
    # stride != 1 (NCHW input) and fall back to the math kernel, which builds the (hw x hw) matrix.
    # From channels_last input (the engine's) these are views; from NCHW, one copy of the features.
    q = F.normalize(query.flatten(2).transpose(1, 2), dim=-1).contiguous()
    k = F.normalize(key.flatten(2).transpose(1, 2), dim=-1).contiguous()
    v = features.flatten(2).transpose(1, 2).contiguous()
    m = fg_mask.reshape(b, h * w, 1).to(v.dtype)  # (B, hw, 1)
    if mask_on == "key":
        # A'_ij = M_j A_ij, so sum_j A'_ij F_j = sum_j A_ij (M_j F_j).
        v = v * m
    # One head of width C; q and k are unit vectors, so the scores are cosines (over the temperature).
    out = F.scaled_dot_product_attention(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=attn_mask, scale=1.0 / temperature
    )
    out = out.squeeze(1)  # (B, hw, C)
    if mask_on in ("query", "class"):
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


def feature_classes(pseudo: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pseudo-label sampled at feature resolution (B, h, w): feature (i, j) takes the label of the
    pixel it is centred on under align_corners (row i (H-1)/(h-1)); 255 counts as background."""
    height, width = pseudo.shape[-2:]
    rows = torch.linspace(0, height - 1, size[0], device=pseudo.device).round().long()
    cols = torch.linspace(0, width - 1, size[1], device=pseudo.device).round().long()
    sampled = pseudo[:, rows][:, :, cols]
    return torch.where(sampled == 255, torch.zeros_like(sampled), sampled)


class LoRM(nn.Module):
    """Two 1x1 projections (with bias) and the learnable scale delta (init 1)."""

    def __init__(self, channels: int, mask_on: MaskOn = "query", temperature: float = 1.0):
        super().__init__()
        self.query_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.key_conv = nn.Conv2d(channels, channels, kernel_size=1)
        self.delta = nn.Parameter(torch.ones(()))
        self.mask_on: MaskOn = mask_on
        self.temperature = temperature

    def forward(
        self, features: torch.Tensor, fg_mask: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        return rectify(
            features,
            self.query_conv(features),
            self.key_conv(features),
            fg_mask,
            self.delta,
            self.mask_on,
            classes=classes,
            temperature=self.temperature,
        )
