"""CDSP losses (Eq. 5, 7-9, 13, 15, 17) as plain functions.

Every loss takes logits at any resolution and, when their size differs from the label's,
upsamples them bilinearly (align_corners=True) first. Label 255 is ignored everywhere. Losses
are computed in float32 (also under autocast) and never modify their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdsp_core.data.layout import IGNORE


def _upsample(logits: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, H, W) in float32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
    return logits


def _masked_mean_ce(logits: torch.Tensor, label: torch.Tensor, eps: float) -> torch.Tensor:
    label = label.long()
    logits = _upsample(logits, tuple(label.shape[-2:]))
    valid = label != IGNORE
    if not bool(valid.any()):
        # Nothing labelled (e.g. a crop with no scribble): contribute 0 but keep the graph.
        return logits.sum() * 0.0
    return F.cross_entropy(logits, label, ignore_index=IGNORE, label_smoothing=eps)


def partial_ce(logits: torch.Tensor, scribble: torch.Tensor) -> torch.Tensor:
    """Partial cross-entropy on the scribbled pixels, mean over non-255 pixels (Eq. 8)."""
    return _masked_mean_ce(logits, scribble, 0.0)


def smoothed_ce(logits: torch.Tensor, pseudo: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Cross-entropy on the pseudo-label with label smoothing eps (Eq. 9), ignoring 255.

    Per pixel: (1 - eps) * CE(y, p) + eps * CE(uniform, p), which is PyTorch's label smoothing.
    """
    return _masked_mean_ce(logits, pseudo, eps)


def distance_entropy(logits: torch.Tensor, dist_map: torch.Tensor) -> torch.Tensor:
    """Distance entropy (Eq. 15/17): -sum_i e_i / count_nonzero(e_i), e_i = (d_i/255) sum_k p log p.

    `dist_map` is (B, H, W), uint8 or float in 0..255. The result is positive (an entropy).
    """
    logits = _upsample(logits, tuple(dist_map.shape[-2:]))
    log_p = F.log_softmax(logits, dim=1)
    neg_entropy = (log_p.exp() * log_p).sum(dim=1)  # (B, H, W), <= 0
    e = (dist_map.float() / 255.0) * neg_entropy
    count = torch.count_nonzero(e.detach())
    if int(count) == 0:
        return e.sum() * 0.0
    return -e.sum() / count


def lorm_loss(features: torch.Tensor, rectified: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """LoRM loss (Eq. 13): sum (F - F_hat)^2 / count_nonzero((F - F_hat)^2). Nothing detached.

    `rows` (B, h, w) bool keeps only those positions (e.g. the foreground: in the official query
    masking F_hat is 0 on background rows, where the loss then pulls F itself towards 0).
    """
    sq = (features.float() - rectified.float()) ** 2
    if rows is not None:
        sq = sq * rows.unsqueeze(1).to(sq.dtype)
    count = torch.count_nonzero(sq.detach())
    if int(count) == 0:
        return sq.sum() * 0.0
    return sq.sum() / count


@dataclass(frozen=True)
class LossConfig:
    """Which terms are on and their weights (Eq. 5): L = sum_t w_t * L_t over switched-on terms."""

    segs: float = 1.0
    segc: float = 1.0
    ds: float = 1.0
    dc: float = 1.0
    lorm: float = 1.0
    label_smoothing: float = 0.1
    lorm_background_rows: bool = True
    """Whether background positions count in the LoRM loss (the official code's, and the default)."""

    def active(self) -> dict[str, float]:
        return {t: w for t in ("segs", "segc", "ds", "dc", "lorm") if (w := getattr(self, t)) > 0}


def cdsp_loss(
    cfg: LossConfig,
    logits: torch.Tensor,
    scribble: torch.Tensor,
    pseudo: torch.Tensor | None = None,
    dist_s: torch.Tensor | None = None,
    dist_c: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    rectified: torch.Tensor | None = None,
    foreground: torch.Tensor | None = None,
    lorm_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full CDSP objective. Returns the total and each active term's detached value.

    `foreground` (B, h, w) is the LoRM rows' mask (needed unless `cfg.lorm_background_rows`);
    `lorm_scale` multiplies the LoRM weight (a warm-up).

    The terms stay tensors so that a training loop can accumulate them on the device and
    synchronise once per logging interval rather than once per term and step.
    """
    terms: dict[str, torch.Tensor] = {}
    active = cfg.active()
    # Upsample once for every pixel-level term (each would do the very same interpolation).
    logits = _upsample(logits, tuple(scribble.shape[-2:]))
    if "segs" in active:
        terms["segs"] = partial_ce(logits, scribble)
    if "segc" in active:
        terms["segc"] = smoothed_ce(logits, _required(pseudo, "pseudo"), cfg.label_smoothing)
    if "ds" in active:
        terms["ds"] = distance_entropy(logits, _required(dist_s, "dist_s"))
    if "dc" in active:
        terms["dc"] = distance_entropy(logits, _required(dist_c, "dist_c"))
    if "lorm" in active:
        rows = None if cfg.lorm_background_rows else _required(foreground, "foreground")
        terms["lorm"] = lorm_loss(_required(features, "features"), _required(rectified, "rectified"), rows)
        active = {**active, "lorm": active["lorm"] * lorm_scale}
    total = sum((active[t] * v for t, v in terms.items()), start=logits.new_zeros((), dtype=torch.float32))
    return total, {t: v.detach() for t, v in terms.items()}


def _required(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"the loss term needs {name!r}, which was not given")
    return x
