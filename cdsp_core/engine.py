"""The training loop of both stages, run by a plain process or by Ray Train: stage 1's classifier
(`cdsp_core.classifier`) and stage 2's segmentor (`cdsp_core.segmentor`) each give it their model,
optimizer and loss; evaluation is in `cdsp_core.evaluation`.

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
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from cdsp_core import runs
from cdsp_core.data.dataset import collate
from cdsp_core.data.layout import DatasetError
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
