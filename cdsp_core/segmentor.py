"""Stage 2: the segmentor (DeepLab with the CDSP loss) built from a spec and trained by the shared
epoch loop (`cdsp_core.engine.fit`); stage 1's counterpart is `cdsp_core.classifier`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdsp_core import runs
from cdsp_core.data.dataset import TrainDataset, WholeImageDataset
from cdsp_core.data.layout import DatasetError, Layout
from cdsp_core.engine import Batch, batch_to, fit, make_train_loader
from cdsp_core.evaluation import evaluate
from cdsp_core.losses import LossConfig, cdsp_loss
from cdsp_core.models import build_segmentor, default_rates, scaled_rates
from cdsp_core.runner import Runner
from cdsp_core.spec import ExperimentSpec


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
        # Absolute: a relative folder (a relative data.root) would be read against data.root once more.
        data.model_copy(update={"pseudo_label_dir": str(pseudo_dir.absolute()) if pseudo_dir else None}),
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
