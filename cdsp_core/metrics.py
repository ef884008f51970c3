"""Confusion matrix and mIoU, all-reduce aware (one bincount per batch)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cdsp_core.data.layout import IGNORE
from cdsp_core.runs import QUALITY_KEYS


class ConfusionMatrix:
    """Counts with rows = ground truth, columns = prediction; ground-truth label 255 is skipped.

    `mat` is K x (K + 1): the last column counts pixels given no class (a prediction outside 0..K-1,
    such as the 255 an external pseudo-label leaves unlabelled). Such a pixel is a miss for its
    ground-truth class and a false positive for none.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        k = self.num_classes
        target = target.to(self.mat.device).reshape(-1).long()
        pred = pred.to(self.mat.device).reshape(-1).long()
        valid = (target >= 0) & (target < k)
        target, pred = target[valid], pred[valid]
        pred = torch.where((pred >= 0) & (pred < k), pred, k)
        self.mat += torch.bincount(target * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the counts of every rank (`reduce` is a sum all-reduce; identity in one process)."""
        self.mat = reduce(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class IoU in [0, 1]; NaN for a class absent from both ground truth and prediction."""
        mat = self.mat.double()
        inter = mat.diag()  # of the K x K part
        union = mat[:, : self.num_classes].sum(0) + mat.sum(1) - inter
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


class LabelQuality:
    """Pseudo-label quality beside its trivial baseline, on all pixels and on unscribbled pixels only.

    The trivial label keeps every scribbled pixel's class and calls every other pixel background.
    Scribbled pixels are right by construction in both, so the unscribbled-pixel mIoU is where a
    pseudo-label can add anything over the scribbles.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.matrices = {key: ConfusionMatrix(num_classes, device) for key in QUALITY_KEYS}

    def update(self, label: torch.Tensor, scribble: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image: `label` the pseudo-label, `scribble` (255 = not scribbled), `gt` the truth."""
        scribble, gt, label = scribble.long(), gt.long(), label.long()
        unscribbled = scribble == IGNORE
        trivial = torch.where(unscribbled, torch.zeros_like(scribble), scribble)
        m = self.matrices
        m["pseudo_label_miou"].update(label, gt)
        m["pseudo_label_unscribbled_miou"].update(label[unscribbled], gt[unscribbled])
        m["trivial_label_miou"].update(trivial, gt)
        m["trivial_label_unscribbled_miou"].update(trivial[unscribbled], gt[unscribbled])

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # One reduction of all four matrices stacked.
        stacked = reduce(torch.stack([m.mat for m in self.matrices.values()]))
        for m, mat in zip(self.matrices.values(), stacked, strict=True):
            m.mat = mat

    def summary(self) -> dict[str, float]:
        """The four mIoUs in percent, keyed by QUALITY_KEYS."""
        return {key: round(m.miou(), 4) for key, m in self.matrices.items()}

    def per_class(self) -> list[float | None]:
        """Per-class IoU of the pseudo-label in percent."""
        return self.matrices["pseudo_label_miou"].per_class()
