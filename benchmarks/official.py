"""The paper's official training step, re-created as faithfully as we can, for side-by-side benchmarks.

What the official code does and we re-create here (not in `cdsp_core`, which never runs it):
- LoRM with the explicit (B, hw, hw) attention matrix: Q Kᵀ by `bmm`, divided by the (B, hw, hw)
  matrix of norm products |Q_i| |K_j|, softmax over keys, `bmm` with V = F, query rows masked,
  times delta; float32, NCHW.
- Every loss term on its own (each upsamples the logits and takes its own softmax), float32.
- Distance maps computed offline by a loop over points (per scribble point for d_s, per boundary
  point for d_c); the training step only reads them.

Its bugs that DESIGN section 4 lists (ignore pixels rewritten to background, padding weighted 255,
no DDP gradient sync) change values or correctness, not speed, so they are left out: both steps
compute the same loss on the same batch.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from cdsp_core.distance import boundary, naive_scribble_distance_map
from cdsp_core.losses import LossConfig, distance_entropy, lorm_loss, partial_ce, smoothed_ce
from cdsp_core.models.lorm import LoRM


def explicit_rectify(
    features: torch.Tensor, query: torch.Tensor, key: torch.Tensor, fg_mask: torch.Tensor, delta: torch.Tensor | float
) -> torch.Tensor:
    """F_hat = delta * M_i * sum_j softmax_j(Q_i.K_j / (|Q_i| |K_j|)) F_j with the (hw x hw) matrix (Eq. 10-12)."""
    b, c, h, w = features.shape
    q = query.reshape(b, c, h * w).permute(0, 2, 1)  # (B, hw, C)
    k = key.reshape(b, c, h * w)  # (B, C, hw)
    energy = torch.bmm(q, k)  # (B, hw, hw)
    norms = torch.bmm(q.norm(dim=2, keepdim=True), k.norm(dim=1, keepdim=True))  # (B, hw, hw)
    attention = torch.softmax(energy / norms, dim=-1)  # rows = queries i
    v = features.reshape(b, c, h * w)  # (B, C, hw)
    out = torch.bmm(v, attention.permute(0, 2, 1)).reshape(b, c, h, w)  # sum_j A_ij F_j
    return delta * out * fg_mask.unsqueeze(1).to(out.dtype)


class ExplicitLoRM(LoRM):
    """`LoRM` with the same parameters (so state dicts are interchangeable), computed explicitly."""

    def forward(
        self, features: torch.Tensor, fg_mask: torch.Tensor, classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The official formulation only (query mask, temperature 1): `classes` is for other masks.
        if self.mask_on != "query" or self.temperature != 1.0:
            raise ValueError("the explicit LoRM reproduces the official form only (query mask, temperature 1)")
        return explicit_rectify(features, self.query_conv(features), self.key_conv(features), fg_mask, self.delta)


def official_model(model: nn.Module) -> nn.Module:
    """A float32, NCHW copy of a `Segmentor` with the same weights and an explicit LoRM."""
    official = copy.deepcopy(model).to(memory_format=torch.contiguous_format).float()
    lorm = getattr(official, "lorm", None)
    if lorm is not None:
        explicit = ExplicitLoRM(lorm.query_conv.in_channels)
        explicit.load_state_dict(lorm.state_dict())
        official.lorm = explicit.to(next(lorm.parameters()).device)
    return official


def official_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    scribble: torch.Tensor,
    pseudo: torch.Tensor,
    dist_s: torch.Tensor,
    dist_c: torch.Tensor,
    features: torch.Tensor,
    rectified: torch.Tensor,
) -> torch.Tensor:
    """Eq. 5 as a sum of independent terms, each upsampling the logits itself."""
    terms = {
        "segs": lambda: partial_ce(logits, scribble),
        "segc": lambda: smoothed_ce(logits, pseudo, cfg.label_smoothing),
        "ds": lambda: distance_entropy(logits, dist_s),
        "dc": lambda: distance_entropy(logits, dist_c),
        "lorm": lambda: lorm_loss(features, rectified),
    }
    return sum((w * terms[t]() for t, w in cfg.active().items()), start=logits.new_zeros((), dtype=torch.float32))


def naive_boundary_distance_map(pseudo: np.ndarray, lam: float, num_classes: int) -> np.ndarray:
    """d_c of Eq. 14 by a loop over every boundary point (the offline per-point way). O(HW x points)."""
    edge = boundary(pseudo, num_classes)
    if not edge.any():
        return np.full(pseudo.shape, 255, np.uint8)
    h, w = pseudo.shape
    yy, xx = np.mgrid[0:h, 0:w]
    best = np.full((h, w), np.inf)
    for y, x in zip(*np.nonzero(edge), strict=True):
        d = np.floor(np.minimum(255.0, np.sqrt(math.exp(lam) * ((yy - y) ** 2 + (xx - x) ** 2))))
        np.minimum(best, d, out=best)
    return best.astype(np.uint8)


__all__ = [
    "ExplicitLoRM",
    "explicit_rectify",
    "naive_boundary_distance_map",
    "naive_scribble_distance_map",
    "official_loss",
    "official_model",
]
