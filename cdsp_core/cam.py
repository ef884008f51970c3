"""Class activation maps and pseudo-labels: the output of stage 1 (Eq. 4, 6).

CAMs are computed with multi-scale + flip inference, upsampled to the image size and each class
normalised by its maximum. The pseudo-label is the argmax over {tau, CAM_k of the classes present
in the image}; scribbled pixels keep their scribbled class.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from cdsp_core.data.dataset import WholeImageDataset, image_labels
from cdsp_core.data.files import write_label
from cdsp_core.data.layout import Layout
from cdsp_core.metrics import ConfusionMatrix
from cdsp_core.runner import Runner, unwrap
from cdsp_core.spec import ExperimentSpec

IGNORE = 255


@torch.no_grad()
def compute_cams(model: nn.Module, image: torch.Tensor, scales: Iterable[float] = (1.0,)) -> torch.Tensor:
    """Summed CAMs (K-1, H, W) of one normalised image (3, H, W) over scales and horizontal flips."""
    size = image.shape[-2:]
    x0 = image.unsqueeze(0)
    total = torch.zeros(())
    for s in scales:
        x = x0 if s == 1.0 else F.interpolate(x0, scale_factor=s, mode="bilinear", align_corners=False)
        both = torch.cat([x, x.flip(-1)])  # (2, 3, h, w): the image and its mirror in one batch
        cams = model.cams(both).float()  # type: ignore[operator]
        cams = cams[0] + cams[1].flip(-1)  # mirror the flipped image's maps back
        total = total + F.interpolate(cams[None], size=size, mode="bilinear", align_corners=False)[0]
    return total


def pseudo_label(cams: torch.Tensor, present: torch.Tensor, threshold: float, scribble: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W) pseudo-label from CAMs (K-1, H, W), the present classes (K-1,) and the scribble.

    Each class map is divided by its maximum; background wins where no present class exceeds tau.
    """
    norm = cams / (cams.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
    norm = torch.where(present.view(-1, 1, 1), norm, torch.full_like(norm, -1.0))
    scores = torch.cat([torch.full_like(norm[:1], threshold), norm])  # (K, H, W): 0 = background
    label = scores.argmax(0).to(torch.uint8)
    scribbled = scribble != IGNORE
    label[scribbled] = scribble[scribbled].to(torch.uint8)
    return label


def generate_pseudo_labels(
    model: nn.Module, spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path, out_dir: Path
) -> ConfusionMatrix | None:
    """Write `out_dir/<id>.png` for this rank's share of the training ids.

    Returns the confusion matrix of pseudo-label against ground truth over all ranks (the
    "base acc" of Table 3), or None when the dataset has no ground-truth folder.
    """
    data = spec.data
    lay = Layout.from_spec(data)
    has_gt = lay.gt_dir.is_dir()
    dataset = WholeImageDataset(data, "train", {"scribble": scribble_dir, "gt": lay.gt_dir if has_gt else None})
    shard = Subset(dataset, list(range(runner.rank, len(dataset), runner.world_size)))
    loader = DataLoader(shard, batch_size=None, num_workers=data.loader_workers)
    net = unwrap(model).eval().to(runner.device)
    cm = ConfusionMatrix(data.num_classes, runner.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    for sample in loader:
        scribble = sample["scribble"]
        present = torch.from_numpy(image_labels(scribble.numpy(), data.num_classes) > 0)
        cams = compute_cams(net, sample["image"].to(runner.device), spec.stage1.cam_scales).cpu()
        label = pseudo_label(cams, present, spec.stage1.cam_threshold, scribble)
        write_label(out_dir / f"{sample['id']}.png", label.numpy())
        if has_gt:
            cm.update(label.to(torch.int64), sample["gt"])
    cm.all_reduce(runner.all_reduce)
    return cm if has_gt else None


def label_quality(spec: ExperimentSpec, label_dir: Path, runner: Runner) -> ConfusionMatrix | None:
    """Confusion matrix of a folder of (e.g. external) pseudo-labels against the training ground truth."""
    lay = Layout.from_spec(spec.data)
    if not lay.gt_dir.is_dir():
        return None
    dataset = WholeImageDataset(spec.data, "train", {"pseudo": label_dir, "gt": lay.gt_dir})
    cm = ConfusionMatrix(spec.data.num_classes)
    for i in range(runner.rank, len(dataset), runner.world_size):
        sample = dataset[i]
        cm.update(sample["pseudo"], sample["gt"])
    cm.all_reduce(runner.all_reduce)
    return cm
