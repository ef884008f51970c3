"""Ray Train adapters: both stages as `train_fn_per_worker`s, and the TorchTrainer that runs one.

Every worker runs the plain engine (`cdsp_core.engine`) with a `Runner` whose hooks are Ray's:
`prepare_model` (DDP), `prepare_data_loader` (DistributedSampler), a sum all-reduce over the
process group (gloo on CPU, NCCL on GPU), `ray.train.report` from every rank after every epoch
with rank 0's checkpoint folder, and resumption from `ray.train.get_checkpoint()`.

Rank 0 writes the run folder (metrics, checkpoints, figures) exactly as a plain `cdsp run` does;
Ray keeps its own state (reported checkpoints, run snapshots) under `<run>/ray/<stage>`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.torch import TorchConfig

# Train V2 classes by their own module (`ray.train` re-exports them; type checkers see V1 there).
from ray.train.v2.api.config import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.v2.torch.torch_trainer import TorchTrainer

from cdsp_core import runs
from cdsp_core.data.layout import Layout, read_ids
from cdsp_core.engine import train_segmentor
from cdsp_core.figures import run_figures
from cdsp_core.pipeline import (
    COMPLETE,
    fetch_atomically,
    finished_pseudo_labels,
    load_stage1_model,
    prepare_run,
    pseudo_label_dir,
    publish_pseudo_labels,
    stage1,
)
from cdsp_core.runner import Runner, latest_run_checkpoint, list_checkpoints
from cdsp_core.spec import ExperimentSpec

RAY_STATE = "ray"
"""Folder of the run folder where Ray Train and Tune keep their own state."""
CONTROLLER_FAILURE_LIMIT_ENV = "CDSP_CONTROLLER_FAILURE_LIMIT"
DEFAULT_CONTROLLER_FAILURE_LIMIT = 10
"""Worker-group start failures tolerated per stage (one per ~60 s spent waiting for resources)."""

TrainFn = Callable[[dict[str, Any]], dict[str, Any]]


# ---- storage ------------------------------------------------------------------------------


def ray_storage(run: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's state of a run: `<run>/ray`, local or through fsspec."""
    location = runs.join(run, RAY_STATE)
    if not runs.is_remote(location):
        return str(runs.local_path(location).expanduser().resolve()), None
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **runs.storage_options(location))
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def worker_spec(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec with a relative `data.root` made absolute: Ray workers run in their own folders."""
    root = Path(spec.data.root).expanduser()
    if root.is_absolute():
        return spec
    return spec.with_overrides({"data.root": str(root.resolve())})


# ---- the Runner's Ray hooks (called inside a worker) -------------------------------------


def _all_reduce(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    # NCCL only reduces CUDA tensors; the engine's label-quality matrix lives on the CPU.
    x = tensor.to(device)
    dist.all_reduce(x)
    return x.to(tensor.device)


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=checkpoint is not None)


def _stage_file(checkpoint: Checkpoint, stage: str) -> str | None:
    fs = checkpoint.filesystem
    assert fs is not None
    infos = fs.get_file_info(pyarrow.fs.FileSelector(checkpoint.path))
    names = sorted(Path(i.path).name for i in infos if i.is_file)
    return next((n for n in reversed(names) if n.startswith(f"{stage}-epoch") and n.endswith(".pt")), None)


def latest_checkpoint(run: str, stage: str) -> Path | None:
    """Where a stage resumes: Ray's latest reported checkpoint, unless the run folder holds a newer one
    (rank 0 writes the run folder first, so a worker killed between that write and the report
    leaves the run folder one epoch ahead; resuming there avoids redoing, and re-logging, the epoch)."""
    ckpt = ray.train.get_checkpoint()
    name = _stage_file(ckpt, stage) if ckpt is not None else None
    newest = list_checkpoints(run, stage)
    if name is None or (newest and newest[-1] > name):
        return latest_run_checkpoint(run, stage)
    assert ckpt is not None
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(ckpt.path) / name
    local = Path(tempfile.mkdtemp(prefix="cdsp-resume-"))
    ckpt.to_directory(str(local))
    return local / name


def _log(line: str) -> None:
    # Not print(): Ray Train patches it to log *and* echo, which doubles every line in the job log.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ray_runner(spec: ExperimentSpec, run: str) -> Runner:
    """A Runner for this Ray Train worker; also sets torch's thread count to the worker's CPUs."""
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.resources.use_gpu else torch.device("cpu")
    return Runner(
        run=run,
        rank=ctx.get_world_rank(),
        world_size=world,
        device=device,
        prepare_model=ray.train.torch.prepare_model,
        # The engine moves every batch to the device itself (non-blocking, pinned on CUDA).
        prepare_loader=partial(ray.train.torch.prepare_data_loader, move_to_device=False),
        all_reduce=partial(_all_reduce, device) if world > 1 else (lambda t: t),
        report=_report,
        latest_checkpoint=partial(latest_checkpoint, run),
        progress=False,  # a job log is no terminal: no progress bars, one line per epoch (verbose)
        log=_log,
    )


def _barrier(runner: Runner) -> None:
    if runner.world_size > 1:
        dist.barrier()


def _load(config: dict[str, Any]) -> tuple[ExperimentSpec, str]:
    return ExperimentSpec.model_validate(config["spec"]), str(config["run"])


# ---- train_fn_per_worker ------------------------------------------------------------------


def upload_share(spec: ExperimentSpec, runner: Runner, local: Path, location: str) -> None:
    """Upload this rank's share of a pseudo-label folder (the ids it labelled) to `location`."""
    for sample_id in read_ids(Layout.from_spec(spec.data).train_list)[runner.rank :: runner.world_size]:
        name = f"{sample_id}.png"
        runs.upload(local / name, runs.join(location, name))


def share_labels(spec: ExperimentSpec, runner: Runner, run: str, local: Path) -> None:
    """The Runner's `share_labels` on Ray: after it, `local` holds every rank's share on this node.

    A local run folder is one folder every rank writes into: a barrier is enough. On object
    storage each node labels into its own cache, so every rank uploads its share, rank 0 marks
    the folder complete, and each node fetches it whole (once, under a lock) before training on.
    """
    if runs.is_remote(run):
        location = runs.join(run, local.name)
        upload_share(spec, runner, local, location)
        _barrier(runner)
        if runner.is_main:
            runs.write_text(runs.join(location, COMPLETE), "ok\n")
        _barrier(runner)
        fetch_atomically(location, local)
    _barrier(runner)


def stage1_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 on this worker: the classifier (DDP), then this rank's share of the pseudo-labels,
    every round (`cdsp_core.pipeline.stage1`).

    Rank 0 publishes the last round's (quality row in metrics.jsonl, `.complete`) once every rank is done.
    """
    spec, run = _load(config)
    runner = ray_runner(spec, run)
    scribble_dir = prepare_run(spec, run, is_main=False)
    out_dir = pseudo_label_dir(run)
    runner.share_labels = partial(share_labels, spec, runner, run)
    model, row = stage1(spec, runner, scribble_dir=scribble_dir, out_dir=out_dir)
    if runs.is_remote(run) and ray.train.get_context().get_node_rank() > 0:
        # Rank 0 uploads its node's cache; ranks on other nodes upload their own share first.
        upload_share(spec, runner, out_dir, runs.join(run, runs.PSEUDO_LABELS))
    _barrier(runner)
    if runner.is_main:
        publish_pseudo_labels(run, out_dir, row)
        runner.log(runs.describe_quality(row))
        if config.get("figures"):
            run_figures(spec, run, None, model, out_dir, scribble_dir, runner.device)
    return {k: row[k] for k in runs.QUALITY_KEYS}


def stage_pseudo_dir(spec: ExperimentSpec, pseudo_from: str | None) -> Path | None:
    """The pseudo-label folder stage 2 reads: external ones, or the finished stage-1 output of a run."""
    if spec.data.pseudo_label_dir is not None:
        return Layout.from_spec(spec.data).pseudo_label_dir
    if not spec.needs_pseudo_labels:
        return None
    done = finished_pseudo_labels(pseudo_from) if pseudo_from else None
    if done is None:
        raise RuntimeError(f"stage 2 needs pseudo-labels but {pseudo_from} holds no finished ones")
    return done[0]


def stage2_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Stage 2 on this worker (DDP); rank 0 returns the final evaluation and draws the figures."""
    spec, run = _load(config)
    runner = ray_runner(spec, run)
    scribble_dir = prepare_run(spec, run, is_main=False)
    pseudo_from = config.get("pseudo_from")
    pseudo_dir = stage_pseudo_dir(spec, pseudo_from)
    model, final = train_segmentor(spec, runner, scribble_dir=scribble_dir, pseudo_dir=pseudo_dir)
    if runner.is_main and config.get("figures"):
        external = spec.data.pseudo_label_dir is not None
        classifier = load_stage1_model(spec, pseudo_from) if pseudo_from and not external else None
        run_figures(spec, run, model, classifier, pseudo_dir, scribble_dir, runner.device)
    return {k: final[k] for k in ("miou", "per_class_iou", "checkpoint", "epochs")}


# ---- the trainer (called by a driver) ------------------------------------------------------


def controller_failure_limit() -> int:
    return int(os.environ.get(CONTROLLER_FAILURE_LIMIT_ENV, DEFAULT_CONTROLLER_FAILURE_LIMIT))


def make_trainer(
    fn: TrainFn,
    stage: str,
    spec: ExperimentSpec,
    run: str,
    *,
    pseudo_from: str | None = None,
    figures: bool = True,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """A TorchTrainer for one stage; `resources.*` of the spec become its scaling and failure configs.

    Its Ray name is the stage, under `<run>/ray`: started again on the same run folder, Ray finds its
    snapshot and `get_checkpoint()` returns the stage's latest checkpoint.
    """
    res = spec.resources
    storage_path, filesystem = ray_storage(run)
    config = {"spec": spec.model_dump(mode="json"), "run": run, "pseudo_from": pseudo_from, "figures": figures}
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    return TorchTrainer(
        fn,  # rank 0's return value becomes Result.return_value
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=stage,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(
                max_failures=res.max_failures, controller_failure_limit=controller_failure_limit()
            ),
            # The run folder keeps `keep_checkpoints`; Ray needs only the newest to resume.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks),
            # Ray Train's INFO lines (every report of every rank) would drown the epoch lines in job logs.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_stage(
    fn: TrainFn,
    stage: str,
    spec: ExperimentSpec,
    run: str,
    *,
    pseudo_from: str | None = None,
    figures: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train one stage on Ray and return rank 0's return value; raises `ray.train.TrainingFailedError`
    once `resources.max_failures` are spent."""
    trainer = make_trainer(fn, stage, spec, run, pseudo_from=pseudo_from, figures=figures, callbacks=callbacks)
    value = getattr(trainer.fit(), "return_value", None)
    if not isinstance(value, dict):
        raise RuntimeError(f"{stage}: the training function returned {value!r}, not a dict")
    return value
