"""Stage 1: the classifier that names the classes an image holds, trained on image-level labels from
the scribbles (and, for dense class maps, on the scribbled pixels), one round at a time.

Its loss, its quality on the validation split (mAP, F1), its model, checkpoint names and training
loop, which runs on `engine.fit` like stage 2. Pseudo-labels are made from it in `cdsp_core.cam`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cdsp_core import runs
from cdsp_core.data.dataset import ClassificationDataset, WholeImageDataset, image_labels
from cdsp_core.data.layout import Layout
from cdsp_core.engine import Batch, batch_to, fit, make_train_loader
from cdsp_core.losses import partial_ce
from cdsp_core.models import build_classifier
from cdsp_core.runner import Runner, unwrap
from cdsp_core.spec import ExperimentSpec


def restrict_to_present(maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Class-map logits (B, K, h, w) with the classes absent from each image pushed to -inf (float32).

    `present` is (B, K) bool, background first. A softmax over the result chooses among the
    classes present only: the image-level labels decide which classes a pixel may take.
    """
    return maps.float().masked_fill(~present[:, :, None, None], float("-inf"))


def stage1_loss(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], dense_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multi-label soft-margin loss over the known entries, plus (dense maps) partial CE on the scribble.

    The partial CE sees only scribbled pixels (background strokes included) and a softmax over the
    classes present in the image.
    """
    per_entry = F.binary_cross_entropy_with_logits(out["logits"].float(), batch["labels"], reduction="none")
    known = batch["known"]
    image = (per_entry * known).sum() / known.sum().clamp(min=1.0)
    if "maps" not in out or dense_weight == 0:
        return image, {"image": image.detach()}
    scribble = batch["scribble"]
    # Upsampled before the restriction: interpolating -inf would give NaN. align_corners=True as
    # everywhere in stage 2 and at inference (cdsp_core.cam.dense_probs): exact for s*k+1 pixels.
    maps = F.interpolate(out["maps"].float(), size=scribble.shape[-2:], mode="bilinear", align_corners=True)
    dense = partial_ce(restrict_to_present(maps, batch["present"]), scribble)
    return image + dense_weight * dense, {"image": image.detach(), "dense": dense.detach()}


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-column average precision of (N, C) scores against 0/1 targets; NaN where a column has no positive."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order).double()  # (N, C), sorted by score
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)[:, None]
    positives = hits.sum(0)
    ap = (precision * hits).sum(0) / positives.clamp(min=1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


@torch.no_grad()
def f1_per_class(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F1 per class (K,) from boolean (N, K) predictions and targets; NaN for a class neither present
    nor predicted in any image (undefined, as its AP is, and left out of the macro mean)."""
    tp = (predicted & targets).sum(0).double()
    counted = (predicted.sum(0) + targets.sum(0)).double()
    return torch.where(counted > 0, 2 * tp / counted.clamp(min=1), torch.full_like(tp, float("nan")))


def classifier_quality(model: nn.Module, dataset: WholeImageDataset, runner: Runner, label_key: str) -> dict[str, Any]:
    """Image-label quality of the stage-1 classifier on whole images (the validation split).

    The targets are the foreground classes present in `label_key` (ground truth when the split has
    it, else the scribbles). Returns mAP and macro F1 (at probability 0.5) in percent, and per-class F1.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    n, k = len(dataset), dataset.num_classes - 1
    scores = torch.zeros(n, k, dtype=torch.float64)
    targets = torch.zeros(n, k, dtype=torch.float64)
    for i in range(runner.rank, n, runner.world_size):
        sample = dataset[i]
        logits = net(sample["image"][None].to(runner.device))["logits"].float().cpu()[0]
        scores[i] = logits.double()
        targets[i] = torch.from_numpy(image_labels(sample[label_key].numpy(), dataset.num_classes)).double()
    net.train(was_training)
    scores, targets = runner.all_reduce(scores), runner.all_reduce(targets)
    f1 = f1_per_class(scores > 0, targets > 0)
    ap = average_precision(scores, targets)
    return {
        "cls_map": round(100 * float(ap.nanmean()), 4),
        "cls_f1": round(100 * float(f1.nanmean()), 4),
        "cls_f1_per_class": [None if v != v else round(100 * float(v), 2) for v in f1.tolist()],
    }


def build_stage1_model(spec: ExperimentSpec, pretrained: bool = True) -> nn.Module:
    s1 = spec.stage1
    weights = s1.pretrained if pretrained else "none"
    return build_classifier(s1.backbone, spec.data.num_classes, s1.output_stride, weights, s1.method)


def stage1_name(round_: int) -> str:
    """The stage name of a stage-1 round in metrics.jsonl and checkpoint names: `stage1`, `stage1-round2`..."""
    return "stage1" if round_ == 1 else f"stage1-round{round_}"


def stage1_checkpoint(spec: ExperimentSpec) -> str:
    """The run-folder path of the final stage-1 classifier's checkpoint (the last round's last epoch)."""
    s1 = spec.stage1
    epochs = s1.round_epochs if s1.rounds > 1 else s1.epochs
    return f"checkpoints/{runs.checkpoint_name(stage1_name(s1.rounds), epochs)}"


def train_classifier(
    spec: ExperimentSpec,
    runner: Runner,
    *,
    scribble_dir: Path,
    round_: int = 1,
    labels_dir: Path | None = None,
    init: nn.Module | None = None,
) -> nn.Module:
    """Stage 1, one round: the classifier on image-level labels from the scribbles (and, dense, on the scribbles).

    Round 1 trains from the backbone's initial weights. A later round fine-tunes `init` (the previous
    round's classifier) for `round_epochs` on `labels_dir`, the previous round's pseudo-labels, which
    then stand in for the scribbles: every labelled pixel supervises the dense maps.
    """
    s1, data = spec.stage1, spec.data
    later = round_ > 1
    if later and (labels_dir is None or init is None):
        raise ValueError(f"stage-1 round {round_} needs the previous round's classifier and pseudo-labels")
    targets = labels_dir if later else scribble_dir
    assert targets is not None
    dataset = ClassificationDataset(data, scribble_dir=targets, crop_labels=s1.crop_labels)
    lay = Layout.from_spec(data)
    label_key = "gt" if lay.gt_dir.is_dir() else "scribble"
    val = WholeImageDataset(data, "val", {label_key: lay.gt_dir if label_key == "gt" else scribble_dir})
    torch.manual_seed(spec.seed)
    model = unwrap(init) if init is not None else build_stage1_model(spec)
    torch.manual_seed(spec.seed * 1000 + 29 + runner.rank + 7 * round_)
    loader = make_train_loader(dataset, s1.batch_size, data.loader_workers, runner, "stage 1")
    lr = s1.round_lr if later else s1.lr

    def compute_loss(net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = batch_to(batch, runner.device, ("image", "labels", "known", "present", "scribble"))
        return stage1_loss(net(t["image"]), t, s1.dense_weight)

    def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
        params = [{"params": list(net.parameters()), "lr": lr}]
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=s1.weight_decay)

    def evaluate_fn(net: nn.Module, epoch: int) -> dict[str, Any]:
        return classifier_quality(net, val, runner, label_key)

    model, _ = fit(
        stage1_name(round_), model, make_optimizer, loader, compute_loss, runner, spec,
        epochs=s1.round_epochs if later else s1.epochs, warmup_epochs=0, keep=1, amp=s1.amp,
        evaluate_fn=evaluate_fn, lr_key="stage1.round_lr" if later else "stage1.lr",
    )  # fmt: skip
    return model
