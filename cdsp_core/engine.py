"""Training and evaluation loops for both stages, run by a plain process or by Ray Train.

One epoch loop (`fit`) serves both stages: per-iteration learning rate (`lr_at`), optional bf16
autocast on CUDA, metrics and an exact-resume checkpoint from rank 0 after every epoch, and
`runner.report` on every rank. The host-specific parts (DDP wrapping, sharding, all-reduce,
where checkpoints come from) are the `Runner`'s hooks.
"""

from __future__ import annotations

import math
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from cdsp_core.data.dataset import ClassificationDataset, TrainDataset, WholeImageDataset, collate
from cdsp_core.data.layout import DatasetError, Layout
from cdsp_core.losses import LossConfig, cdsp_loss
from cdsp_core.metrics import ConfusionMatrix
from cdsp_core.models import build_classifier, build_segmentor
from cdsp_core.runner import (
    EpochTimer,
    Runner,
    append_metrics,
    checkpoint_name,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from cdsp_core.spec import LOSS_TERMS, ExperimentSpec

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def epoch_seed(seed: int, stage: str, rank: int, epoch: int) -> int:
    """The torch seed of one rank's epoch: distinct across stages, ranks and epochs, stable across runs."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + rank * 104_729 + epoch) % (2**63)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate before optimizer step `step` (0-based): linear warm-up from 0, then cosine to 0."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return 0.0
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return base_lr * (1 + math.cos(math.pi * t)) / 2


def autocast(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on CUDA when enabled; a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_train_loader(dataset: Dataset, global_batch: int, workers: int, runner: Runner, stage: str) -> DataLoader:
    per_rank = global_batch // runner.world_size
    n = len(dataset)  # type: ignore[arg-type]
    if n // runner.world_size < per_rank:
        raise DatasetError(
            f"{stage}: the training split has {n} images, too few for batch size {global_batch} "
            f"over {runner.world_size} worker(s)"
        )
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,  # equal steps on every rank, and no BatchNorm on a batch of one
        pin_memory=runner.device.type == "cuda",
        # Not persistent: workers are re-seeded from the main RNG every epoch, so a resumed run
        # draws the same augmentations as an uninterrupted one.
        persistent_workers=False,
    )
    return runner.prepare_loader(loader)


def _to(batch: Batch, device: torch.device, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


# ---- the epoch loop -----------------------------------------------------------------------


def fit(
    stage: str,
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loader: DataLoader,
    compute_loss: LossFn,
    runner: Runner,
    spec: ExperimentSpec,
    *,
    epochs: int,
    warmup_epochs: float,
    keep: int,
    evaluate_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for `epochs`, resuming from the runner's latest checkpoint of `stage`.

    Returns the (prepared) model and the last epoch's metrics row.
    """
    start_epoch, step, last_row = 1, 0, {}
    resume = runner.find_checkpoint(stage)
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
    model = runner.prepare_model(model)
    optimizer = make_optimizer(unwrap(model))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, step, last_row = state["epoch"] + 1, state["step"], state.get("row", {})
        if runner.is_main:
            runner.log(f"{stage}: resuming from {resume} at epoch {start_epoch}")
    steps_per_epoch = len(loader)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    amp = spec.stage2.amp
    for epoch in range(start_epoch, epochs + 1):
        timer = EpochTimer()
        # Each rank's random stream for this epoch (shuffling, the loader workers' seeds, hence the
        # augmentation) is a function of (seed, stage, rank, epoch): a resumed run, on one process
        # or on many ranks, draws exactly what an uninterrupted one would have drawn.
        torch.manual_seed(epoch_seed(spec.seed, stage, runner.rank, epoch))
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(
            loader, desc=f"{stage} {epoch}/{epochs}", leave=False, disable=not (runner.is_main and runner.progress)
        )
        for batch in bar:
            factor = lr_at(step, total, warmup, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with autocast(runner.device, amp):
                loss, terms = compute_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            for name, value in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in terms.items()}}.items():
                sums[name] = sums.get(name, 0) + value.float()
            if runner.on_step is not None:
                runner.on_step(stage, epoch, step)
        row = _epoch_row(stage, epoch, epochs, step, sums, steps_per_epoch, runner, optimizer)
        if evaluate_fn is not None:
            row.update(evaluate_fn(model, epoch))
        row["epoch_seconds"] = timer.seconds()
        row["time"] = time.time()
        folder = None
        if runner.is_main:
            append_metrics(runner.run, row)
            state = {
                "stage": stage,
                "epoch": epoch,
                "step": step,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "spec": spec.model_dump(mode="json"),
                "row": row,
            }
            folder = save_checkpoint(runner, stage, epoch, state, keep)
            if runner.verbose:
                runner.log(_epoch_line(row))
        runner.report(row, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # the host has had it; the run folder keeps a copy
        last_row = row
    return model, last_row


def _epoch_row(
    stage: str,
    epoch: int,
    epochs: int,
    step: int,
    sums: dict[str, torch.Tensor],
    steps: int,
    runner: Runner,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    names = sorted(sums)
    # One all-reduce of all the running sums: the epoch means over every rank's batches.
    stacked = torch.stack([torch.as_tensor(sums[n], device=runner.device).float() for n in names]) if names else None
    row: dict[str, Any] = {"stage": stage, "epoch": epoch, "epochs": epochs, "step": step}
    if stacked is not None:
        stacked = runner.all_reduce(stacked) / (steps * runner.world_size)
        row.update({n: round(float(v), 6) for n, v in zip(names, stacked.tolist(), strict=True)})
    row["lr"] = optimizer.param_groups[0]["lr"]
    return row


def _epoch_line(row: dict[str, Any]) -> str:
    parts = [f"{row['stage']} epoch {row['epoch']}/{row['epochs']}", f"loss {row.get('loss', float('nan')):.4f}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss_")]
    parts.append(f"lr {row['lr']:.2e}")
    if "miou" in row:
        parts.append(f"mIoU {row['miou']:.2f}")
    parts.append(f"{row['epoch_seconds']:.1f}s")
    return " | ".join(parts)


# ---- evaluation --------------------------------------------------------------------------


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


def _same_size_batches(samples: list[Batch]) -> Iterable[Batch]:
    """Stack samples of equal image size; whole images of different sizes go one by one."""
    groups: dict[tuple[int, ...], list[Batch]] = {}
    for s in samples:
        groups.setdefault(tuple(s["image"].shape), []).append(s)
    for group in groups.values():
        yield collate(group)


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
        for batch in _same_size_batches(samples):
            images = batch["image"].to(runner.device, non_blocking=True)
            with autocast(runner.device, amp):
                probs = predict_probs(net, images, scales, flip)
            cm.update(probs.argmax(1), batch[label_key].to(runner.device))
    net.train(was_training)
    cm.all_reduce(runner.all_reduce)
    return cm


# ---- stage 2 -----------------------------------------------------------------------------


def loss_config(spec: ExperimentSpec) -> LossConfig:
    """Weights of the switched-on terms (a switched-off term has weight 0)."""
    s2 = spec.stage2
    weights = {t: getattr(s2.loss_weights, t) if getattr(s2.losses, t) else 0.0 for t in LOSS_TERMS}
    return LossConfig(**weights, label_smoothing=s2.label_smoothing)


def build_stage2_model(spec: ExperimentSpec) -> nn.Module:
    s2 = spec.stage2
    with_lorm = s2.losses.lorm and s2.loss_weights.lorm > 0
    return build_segmentor(
        s2.segmentor, s2.backbone, spec.data.num_classes, s2.output_stride, s2.pretrained, with_lorm, s2.lorm_mask
    )


def train_segmentor(
    spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path, pseudo_dir: Path | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 2: DeepLab with the CDSP loss. Returns the model and its final evaluation."""
    s2, data = spec.stage2, spec.data
    cfg = loss_config(spec)
    active = cfg.active()
    need_pseudo = any(t in active for t in ("segc", "dc", "lorm"))
    if need_pseudo and pseudo_dir is None:
        raise DatasetError(f"stage 2 needs pseudo-labels for the loss terms {sorted(active)} but none were given")
    dataset = TrainDataset(
        data.model_copy(update={"pseudo_label_dir": str(pseudo_dir) if pseudo_dir else None}),
        scribble_dir=scribble_dir,
        with_pseudo=need_pseudo,
        with_dist_s="ds" in active,
        with_dist_c="dc" in active,
        lambda_s=s2.lambda_s,
        lambda_c=s2.lambda_c,
    )
    lay = Layout.from_spec(data)
    val = WholeImageDataset(data, "val", {"gt": lay.gt_dir})
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = build_stage2_model(spec)
    if s2.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(spec.seed * 1000 + 17 + runner.rank)  # per-rank augmentation stream
    loader = make_train_loader(dataset, s2.batch_size, data.loader_workers, runner, "stage 2")
    uses_pseudo_in_model = "lorm" in active

    def compute_loss(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = _to(batch, runner.device, ("image", "scribble", "pseudo", "dist_s", "dist_c"))
        images = t["image"]
        if s2.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = net(images, t.get("pseudo") if uses_pseudo_in_model else None)
        return cdsp_loss(
            cfg,
            out["logits"],
            t["scribble"],
            t.get("pseudo"),
            t.get("dist_s"),
            t.get("dist_c"),
            out.get("features"),
            out.get("rectified"),
        )

    def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            net.param_groups(s2.lr, s2.head_lr_mult),  # type: ignore[operator]
            lr=s2.lr,
            momentum=s2.momentum,
            weight_decay=s2.weight_decay,
        )

    final: dict[str, Any] = {}

    def evaluate_fn(net: nn.Module, epoch: int) -> dict[str, Any]:
        if epoch % s2.eval_every and epoch != s2.epochs:
            return {}
        cm = evaluate(
            net,
            val,
            runner,
            data.num_classes,
            scales=s2.eval_scales,
            flip=s2.eval_flip,
            workers=data.loader_workers,
            amp=s2.amp,
        )
        final.update(miou=round(cm.miou(), 4), per_class_iou=cm.per_class())
        return {"miou": final["miou"]}

    model, row = fit(
        "stage2", model, make_optimizer, loader, compute_loss, runner, spec,
        epochs=s2.epochs, warmup_epochs=s2.warmup_epochs, keep=s2.keep_checkpoints, evaluate_fn=evaluate_fn,
    )  # fmt: skip
    if not final:  # resumed after the last epoch: evaluate the loaded model once more
        evaluate_fn(model, s2.epochs)
    final.update(epochs=s2.epochs, checkpoint=f"checkpoints/{checkpoint_name('stage2', s2.epochs)}", row=row)
    return model, final


# ---- stage 1 -----------------------------------------------------------------------------


def train_classifier(spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path) -> nn.Module:
    """Stage 1: the multi-label CAM classifier on image-level labels from the scribbles."""
    s1, data = spec.stage1, spec.data
    dataset = ClassificationDataset(data, scribble_dir=scribble_dir, crop_labels=s1.crop_labels)
    torch.manual_seed(spec.seed)
    model: nn.Module = build_classifier(s1.backbone, data.num_classes, s1.output_stride, s1.pretrained)
    torch.manual_seed(spec.seed * 1000 + 29 + runner.rank)
    loader = make_train_loader(dataset, s1.batch_size, data.loader_workers, runner, "stage 1")

    def compute_loss(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = _to(batch, runner.device, ("image", "labels", "known"))
        logits = net(t["image"]).float()
        # The multi-label soft-margin loss (mean binary cross-entropy) over the known entries.
        per_entry = F.binary_cross_entropy_with_logits(logits, t["labels"], reduction="none")
        return (per_entry * t["known"]).sum() / t["known"].sum().clamp(min=1.0), {}

    def make_optimizer(net: nn.Module) -> torch.optim.Optimizer:
        params = [{"params": list(net.parameters()), "lr": s1.lr, "base_lr": s1.lr}]
        return torch.optim.SGD(params, lr=s1.lr, momentum=0.9, weight_decay=s1.weight_decay)

    model, _ = fit(
        "stage1", model, make_optimizer, loader, compute_loss, runner, spec,
        epochs=s1.epochs, warmup_epochs=0, keep=1,
    )  # fmt: skip
    return model
