"""Class maps and pseudo-labels: the output of stage 1 (Eq. 4, 6, and our dense path).

Both stage-1 methods end in per-pixel probabilities over the K classes, zero on the classes absent
from the image (the image-level labels, read from the scribble, restrict every pixel's choice):

- `cam` (the paper): CAMs with multi-scale + flip inference, each class normalised by its maximum,
  beside a constant background score tau; their argmax is the paper's thresholded pseudo-label.
- `dense` (ours): the softmax of the dense class maps over background and the present classes,
  averaged over scales and flips.

`refine: random_walk` then propagates the scribbles along image edges with those probabilities as
the prior (`cdsp_core.refine`). The pseudo-label is the argmax, and scribbled pixels keep their
scribbled class. Images are processed in batches of equal size; ranks split the ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from cdsp_core.classifier import restrict_to_present
from cdsp_core.data.dataset import WholeImageDataset, image_labels, same_size_batches
from cdsp_core.data.files import write_label
from cdsp_core.data.layout import IGNORE, Layout
from cdsp_core.engine import autocast
from cdsp_core.metrics import QUALITY_KEYS, LabelQuality
from cdsp_core.refine import random_walk
from cdsp_core.runner import Runner, unwrap
from cdsp_core.spec import ExperimentSpec, Stage1Spec

INFER_BATCH = 16
"""Images per forward pass of the pseudo-label pass (each also flipped: twice as many)."""


def _resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


@torch.no_grad()
def compute_cams(model: nn.Module, images: torch.Tensor, scales: Iterable[float] = (1.0,)) -> torch.Tensor:
    """CAMs (B, K-1, H, W) of normalised images (B, 3, H, W), summed over scales and horizontal flips."""
    size = images.shape[-2:]
    n = len(images)
    total = torch.zeros(())
    for s in scales:
        x = _resize(images, s)
        cams = model.cams(torch.cat([x, x.flip(-1)])).float()  # type: ignore[operator]
        cams = cams[:n] + cams[n:].flip(-1)  # mirror the flipped views' maps back
        total = total + F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    return total


def cam_probs(cams: torch.Tensor, present: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, K, H, W) probabilities from CAMs (B, K-1, H, W), `present` (B, K) bool (background first).

    Each class map is divided by its maximum; background scores tau. The scores of the present
    classes, divided by their sum, keep the paper's rule as their argmax: background wins where no
    present class exceeds tau.
    """
    norm = cams / (cams.flatten(2).amax(2)[..., None, None] + 1e-5)
    scores = torch.cat([torch.full_like(norm[:, :1], threshold), norm], dim=1)
    scores = scores * present[:, :, None, None]
    return scores / scores.sum(1, keepdim=True).clamp(min=1e-6)


@torch.no_grad()
def dense_probs(model: nn.Module, images: torch.Tensor, present: torch.Tensor, scales: Iterable[float]) -> torch.Tensor:
    """(B, K, H, W) softmax of the dense maps over the present classes, averaged over scales and flips."""
    size = images.shape[-2:]
    n = len(images)
    both_present = torch.cat([present, present])
    total = torch.zeros(())
    count = 0
    for s in scales:
        x = _resize(images, s)
        maps = model.maps(torch.cat([x, x.flip(-1)]))  # type: ignore[operator]
        maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=True)
        probs = restrict_to_present(maps, both_present).softmax(1)
        total = total + probs[:n] + probs[n:].flip(-1)
        count += 2
    return total / count


def class_probs(model: nn.Module, images: torch.Tensor, present: torch.Tensor, s1: Stage1Spec) -> torch.Tensor:
    """Per-pixel probabilities (B, K, H, W) of the stage-1 method, zero on absent classes."""
    if s1.method == "cam":
        return cam_probs(compute_cams(model, images, s1.cam_scales), present, s1.cam_threshold)
    return dense_probs(model, images, present, s1.cam_scales)


def refine(image: torch.Tensor, probs: torch.Tensor, scribble: torch.Tensor, s1: Stage1Spec) -> torch.Tensor:
    """Random-walk refinement of one image's probabilities (K, H, W); absent classes stay 0.

    `image` (3, H, W) gives the edge weights (any per-channel scaling), `scribble` (H, W) the seeds:
    every scribbled pixel, background strokes included, is a seed of its class. The walk chooses
    among background, the scribble's classes (also one whose prior is zero everywhere, as a CAM can
    be: its seeds still spread) and any other class the prior gives weight.
    """
    present = present_classes(scribble, probs.shape[0]) | (probs.flatten(1).amax(1) > 0)
    labels = present.nonzero().flatten()  # the L classes the walk chooses from
    lut = torch.full((256,), -1, dtype=torch.int64)
    lut[labels] = torch.arange(len(labels))
    seeds = lut[scribble.long()]  # 255: not a seed
    walked = random_walk(
        image.permute(1, 2, 0).numpy(),
        seeds.numpy(),
        probs[labels].double().numpy(),
        beta=s1.rw_beta,
        prior_weight=s1.rw_prior_weight,
        connectivity=s1.rw_connectivity,
    )
    out = torch.zeros_like(probs)
    out[labels] = torch.from_numpy(walked).to(probs.dtype)
    return out


def pseudo_label(probs: torch.Tensor, scribble: torch.Tensor, background_bias: float = 1.0) -> torch.Tensor:
    """uint8 (H, W) pseudo-label: the argmax of probabilities (K, H, W), the background's multiplied by
    `background_bias` first; scribbled pixels keep their class."""
    if background_bias != 1.0:
        probs = torch.cat([probs[:1] * background_bias, probs[1:]])
    label = probs.argmax(0).to(torch.uint8)
    scribbled = scribble != IGNORE
    label[scribbled] = scribble[scribbled].to(torch.uint8)
    return label


def present_classes(scribble: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) bool: background and the foreground classes of the scribble."""
    fg = torch.from_numpy(image_labels(scribble.numpy(), num_classes) > 0)
    return torch.cat([torch.ones(1, dtype=torch.bool), fg])


def generate_pseudo_labels(
    model: nn.Module, spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path, out_dir: Path
) -> tuple[LabelQuality | None, dict[str, float]]:
    """Write `out_dir/<id>.png` for this rank's share of the training ids.

    Returns the quality against ground truth over all ranks (the "base acc" of Table 3, beside the
    trivial label), or None when the dataset has no ground-truth folder; and timings (seconds in
    all and per image, this rank).
    """
    data, s1 = spec.data, spec.stage1
    lay = Layout.from_spec(data)
    has_gt = lay.gt_dir.is_dir()
    dataset = WholeImageDataset(data, "train", {"scribble": scribble_dir, "gt": lay.gt_dir if has_gt else None})
    shard = Subset(dataset, list(range(runner.rank, len(dataset), runner.world_size)))
    loader = DataLoader(shard, batch_size=INFER_BATCH, num_workers=data.loader_workers, collate_fn=list)
    net = unwrap(model).eval().to(runner.device)
    quality = LabelQuality(data.num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for samples in loader:
        for batch in same_size_batches(samples):
            present = torch.stack([present_classes(s, data.num_classes) for s in batch["scribble"]])
            with autocast(runner.device, s1.amp):
                probs = class_probs(net, batch["image"].to(runner.device), present.to(runner.device), s1)
            probs = probs.float().cpu()
            for i, sample_id in enumerate(batch["id"]):
                scribble = batch["scribble"][i]
                p = refine(batch["image"][i], probs[i], scribble, s1) if s1.refine == "random_walk" else probs[i]
                label = pseudo_label(p, scribble, s1.background_bias)
                write_label(out_dir / f"{sample_id}.png", label.numpy())
                if has_gt:
                    quality.update(label, scribble, batch["gt"][i])
    seconds = time.perf_counter() - start
    quality.all_reduce(runner.all_reduce)
    timing = {"pseudo_label_seconds": round(seconds, 2), "seconds_per_image": round(seconds / max(1, len(shard)), 4)}
    return (quality if has_gt else None), timing


def label_quality(spec: ExperimentSpec, label_dir: Path, scribble_dir: Path, runner: Runner) -> LabelQuality | None:
    """Quality of a folder of (e.g. external) pseudo-labels against the training ground truth."""
    lay = Layout.from_spec(spec.data)
    if not lay.gt_dir.is_dir():
        return None
    dataset = WholeImageDataset(spec.data, "train", {"pseudo": label_dir, "scribble": scribble_dir, "gt": lay.gt_dir})
    quality = LabelQuality(spec.data.num_classes)
    for i in range(runner.rank, len(dataset), runner.world_size):
        sample = dataset[i]
        quality.update(sample["pseudo"], sample["scribble"], sample["gt"])
    quality.all_reduce(runner.all_reduce)
    return quality


def quality_row(quality: LabelQuality | None) -> dict[str, float | None]:
    """The four quality figures (None without ground truth), as metrics.jsonl and result.json carry them."""
    summary = quality.summary() if quality is not None else {}
    return {key: summary.get(key) for key in QUALITY_KEYS}
