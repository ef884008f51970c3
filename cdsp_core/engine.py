"""Training and evaluation loops for both stages, run by a plain process or by Ray Train; stage 2's
segmentor here, stage 1's classifier in `cdsp_core.classifier`.

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
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from cdsp_core import runs
from cdsp_core.data.dataset import (
    TrainDataset,
    WholeImageDataset,
    collate,
    same_size_batches,
)
from cdsp_core.data.layout import DatasetError, Layout
from cdsp_core.losses import LossConfig, cdsp_loss
from cdsp_core.metrics import ConfusionMatrix
from cdsp_core.models import build_segmentor, default_rates, scaled_rates
from cdsp_core.runner import (
    EpochTimer,
    Runner,
    append_metrics,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from cdsp_core.spec import ExperimentSpec

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(model, batch, optimizer step) -> (loss, detached terms)."""


def epoch_seed(seed: int, stage: str, rank: int, epoch: int) -> int:
    """The torch seed of one rank's epoch: distinct across stages, ranks and epochs, stable across runs."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode()) * 7919 + rank * 104_729 + epoch) % (2**63)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate before optimizer step `step` (0-based): linear warm-up from 0, then cosine to 0
    (with base_lr 1, the factor a LambdaLR applies to each parameter group's own rate)."""
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


def batch_to(batch: Batch, device: torch.device, keys: Iterable[str]) -> dict[str, torch.Tensor]:
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
    amp: bool,
    evaluate_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    lr_key: str = "stage2.lr",
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `model` for `epochs`, resuming from the runner's latest checkpoint of `stage`.

    Returns the (prepared) model and the last epoch's metrics row. `lr_key` names the spec key of the
    rate in use, for the advice of a diverged epoch.
    """
    start_epoch, step, last_row = 1, 0, {}
    resume = runner.find_checkpoint(stage)
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
    # On the runner's device before the host wraps it: the default hook is the identity, and Ray's
    # would move it anyway. Batches follow `runner.device` too (`batch_to`).
    model = runner.prepare_model(model.to(runner.device))
    optimizer = make_optimizer(unwrap(model))
    steps_per_epoch = len(loader)
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    # Made before the optimizer's state is loaded: it records each group's initial lr (the base one).
    scheduler = LambdaLR(optimizer, partial(lr_at, total_steps=total, warmup_steps=warmup, base_lr=1.0))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, step, last_row = state["epoch"] + 1, state["step"], state.get("row", {})
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        else:  # written before the schedule was saved: its step count says where the schedule stands
            scheduler.last_epoch = step
            for group in optimizer.param_groups:  # those groups kept their base rate as "base_lr"
                group["initial_lr"] = group.pop("base_lr")
                group["lr"] = group["initial_lr"] * lr_at(step, total, warmup, 1.0)
        if runner.is_main:
            runner.log(f"{stage}: resuming from {resume} at epoch {start_epoch}")
            ensure_logged(runner.run, last_row)
    lr = optimizer.param_groups[0]["lr"]
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
            lr = optimizer.param_groups[0]["lr"]
            with autocast(runner.device, amp):
                loss, terms = compute_loss(model, batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            for name, value in {"loss": loss.detach(), **{f"loss_{k}": v for k, v in terms.items()}}.items():
                sums[name] = sums.get(name, 0) + value.float()
            if runner.on_step is not None:
                runner.on_step(stage, epoch, step)
        row = _epoch_row(stage, epoch, epochs, step, sums, steps_per_epoch, runner, lr)
        check_finite(row, lr_key)  # every rank the same row: all raise, none waits
        if evaluate_fn is not None:
            row.update(evaluate_fn(model, epoch))
        row["epoch_seconds"] = timer.seconds()
        row["time"] = time.time()
        folder = None
        if runner.is_main:
            state = {
                "stage": stage,
                "epoch": epoch,
                "step": step,
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "spec": spec.model_dump(mode="json"),
                "row": row,
            }
            # The checkpoint first, then its row: a process killed between the two leaves a checkpoint
            # whose row the resumed run appends (`ensure_logged`), so every epoch is logged exactly once.
            folder = save_checkpoint(runner, stage, epoch, state, keep)
            append_metrics(runner.run, row)
            if runner.verbose:
                runner.log(_epoch_line(row))
        runner.report(row, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)  # the host has had it; the run folder keeps a copy
        last_row = row
    return model, last_row


class TrainingDiverged(RuntimeError):
    """The epoch's mean training loss is NaN or infinite: the weights are lost to it."""


def check_finite(row: dict[str, Any], lr_key: str) -> None:
    """Stop a diverged stage before its epoch is saved: the run's latest checkpoint stays the last good
    epoch (a retry resumes from it, not from NaN weights), and no search trial trains on for nothing."""
    loss = row.get("loss")
    if loss is None or math.isfinite(loss):
        return
    terms = ", ".join(f"{k[5:]} {v}" for k, v in sorted(row.items()) if k.startswith("loss_"))
    raise TrainingDiverged(
        f"{row['stage']} epoch {row['epoch']}: the training loss is {loss} ({terms or 'one term'}): training "
        f"diverged at learning rate {row['lr']:.3g}; nothing of this epoch was saved. Lower {lr_key} "
        "(or the loss weights) and retry: it resumes from the last saved epoch"
    )


def ensure_logged(run: str, row: dict[str, Any]) -> None:
    """Append a resumed checkpoint's epoch row to metrics.jsonl unless it is already there."""
    if not row:
        return
    key = (row.get("stage"), row.get("epoch"))
    if not any((r.get("stage"), r.get("epoch")) == key for r in runs.read_jsonl(runs.join(run, runs.METRICS))):
        append_metrics(run, row)


def _epoch_row(
    stage: str,
    epoch: int,
    epochs: int,
    step: int,
    sums: dict[str, torch.Tensor],
    steps: int,
    runner: Runner,
    lr: float,
) -> dict[str, Any]:
    names = sorted(sums)
    # One all-reduce of all the running sums: the epoch means over every rank's batches.
    stacked = torch.stack([torch.as_tensor(sums[n], device=runner.device).float() for n in names]) if names else None
    row: dict[str, Any] = {"stage": stage, "epoch": epoch, "epochs": epochs, "step": step}
    if stacked is not None:
        stacked = runner.all_reduce(stacked) / (steps * runner.world_size)
        row.update({n: round(float(v), 6) for n, v in zip(names, stacked.tolist(), strict=True)})
    row["lr"] = lr  # of the epoch's last step
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


# ---- stage 2 -----------------------------------------------------------------------------


def loss_config(spec: ExperimentSpec) -> LossConfig:
    """Weights of the switched-on terms (a switched-off term has weight 0)."""
    s2 = spec.stage2
    return LossConfig(
        **spec.loss_weights_in_use, label_smoothing=s2.label_smoothing, lorm_background_rows=s2.lorm_background_rows
    )


def stage2_rates(spec: ExperimentSpec) -> tuple[int, ...]:
    """The ASPP's 3x3 rates: the spec's, else the head form's scaled to the crop's feature map."""
    s2 = spec.stage2
    if s2.aspp_rates is not None:
        return tuple(s2.aspp_rates)
    return scaled_rates(
        default_rates(s2.segmentor, s2.head_form, s2.output_stride), spec.data.crop_size, s2.output_stride
    )


def sync_batchnorm(model: nn.Module, spec: ExperimentSpec, world_size: int) -> nn.Module:
    """The model with its BatchNorms synchronised across DDP workers when the spec asks and there are several."""
    if spec.stage2.sync_batchnorm and world_size > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_stage2_model(spec: ExperimentSpec, pretrained: bool = True) -> nn.Module:
    """The spec's segmentor; `pretrained=False` skips the backbone's initial weights (for a model whose
    weights come next from a checkpoint, on a machine that may not hold the ImageNet file)."""
    s2 = spec.stage2
    with_lorm = s2.losses.lorm and s2.loss_weights.lorm > 0
    weights = s2.pretrained if pretrained else "none"
    return build_segmentor(
        s2.segmentor, s2.backbone, spec.data.num_classes, s2.output_stride, weights, with_lorm, s2.lorm_mask,
        s2.head_form, stage2_rates(spec), s2.lorm_temperature,
    )  # fmt: skip


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
    model = sync_batchnorm(build_stage2_model(spec), spec, runner.world_size)
    if s2.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(spec.seed * 1000 + 17 + runner.rank)  # per-rank augmentation stream
    loader = make_train_loader(dataset, s2.batch_size, data.loader_workers, runner, "stage 2")
    uses_pseudo_in_model = "lorm" in active
    lorm_warmup_steps = s2.lorm_warmup_epochs * len(loader)

    def compute_loss(net: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = batch_to(batch, runner.device, ("image", "scribble", "pseudo", "dist_s", "dist_c"))
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
            out.get("foreground"),
            lorm_scale=min(1.0, step / lorm_warmup_steps) if lorm_warmup_steps else 1.0,
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
        epochs=s2.epochs, warmup_epochs=s2.warmup_epochs, keep=s2.keep_checkpoints, amp=s2.amp,
        evaluate_fn=evaluate_fn,
    )  # fmt: skip
    if not final:  # resumed after the last epoch: evaluate the loaded model once more
        evaluate_fn(model, s2.epochs)
    final.update(epochs=s2.epochs, checkpoint=f"checkpoints/{runs.checkpoint_name('stage2', s2.epochs)}", row=row)
    return model, final
