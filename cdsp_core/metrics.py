"""Confusion matrix and mIoU, all-reduce aware (one bincount per batch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE = 255


class ConfusionMatrix:
    """K x K counts: rows = ground truth, columns = prediction; label 255 is skipped."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes
        target = target.to(self.mat.device).reshape(-1).long()
        pred = pred.to(self.mat.device).reshape(-1).long()
        valid = (target >= 0) & (target < k)
        self.mat += torch.bincount(target[valid] * k + pred[valid], minlength=k * k).reshape(k, k)

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the counts of every rank (`reduce` is a sum all-reduce; identity in one process)."""
        self.mat = reduce(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1]; NaN for a class absent from both ground truth and prediction."""
        mat = self.mat.double()
        inter = mat.diag()
        union = mat.sum(0) + mat.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        """Mean IoU in percent over the classes that occur (in ground truth or prediction)."""
        iou = self.iou()
        return float(100 * iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan")

    def per_class(self) -> list[float | None]:
        """Per-class IoU in percent (None where undefined), for result.json."""
        return [None if v != v else round(100 * float(v), 4) for v in self.iou().tolist()]

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(100 * self.mat.diag().sum() / total) if total > 0 else float("nan")
