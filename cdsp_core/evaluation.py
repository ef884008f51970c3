"""Evaluation on whole images: class probabilities over scales and flips, and the confusion matrix of
a validation split, sharded over the ranks of a distributed run and summed across them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cdsp_core.data.dataset import same_size_batches
from cdsp_core.engine import autocast
from cdsp_core.metrics import ConfusionMatrix
from cdsp_core.runner import Runner, unwrap


@torch.no_grad()
def predict_probs(
    model: nn.Module, images: torch.Tensor, scales: Iterable[float] = (1.0,), flip: bool = False
) -> torch.Tensor:
    """Class probabilities (B, K, H, W) averaged over scales (and horizontal flips)."""
    size = images.shape[-2:]
    total: torch.Tensor | None = None
    n = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=True)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            logits = model(xi)["logits"].float()
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
            probs = logits.softmax(1)
            probs = probs.flip(-1) if flipped else probs
            total = probs if total is None else total + probs
            n += 1
    assert total is not None
    return total / n


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    runner: Runner,
    num_classes: int,
    *,
    scales: Iterable[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 8,
    workers: int = 0,
    amp: bool = True,
    label_key: str = "gt",
) -> ConfusionMatrix:
    """Confusion matrix on whole images; each rank takes every world_size-th image, then all-reduce."""
    shard = Subset(dataset, list(range(runner.rank, len(dataset), runner.world_size)))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=list)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    cm = ConfusionMatrix(num_classes, runner.device)
    scales = tuple(scales)
    for samples in loader:
        for batch in same_size_batches(samples):
            images = batch["image"].to(runner.device, non_blocking=True)
            with autocast(runner.device, amp):
                probs = predict_probs(net, images, scales, flip)
            cm.update(probs.argmax(1), batch[label_key].to(runner.device))
    net.train(was_training)
    cm.all_reduce(runner.all_reduce)
    return cm
