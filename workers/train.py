"""The Ray launcher: a stage function of `cdsp_core.pipeline` (`stage1`, `stage2`) run on every worker
of a TorchTrainer.

Every worker runs the stage function with a `Runner` whose hooks are Ray's: `prepare_model` (DDP),
`prepare_data_loader` (DistributedSampler), a sum all-reduce over the process group (gloo on CPU,
NCCL on GPU), `ray.train.report` from every rank after every epoch with rank 0's checkpoint folder,
resumption from `ray.train.get_checkpoint()`, and the barriers and node-local uploads that bring
the ranks' shares of stage 1's pseudo-labels together.

Rank 0 writes the run folder (metrics, checkpoints, figures) exactly as a plain `cdsp run` does;
Ray keeps its own state (reported checkpoints, run snapshots) under `<run>/ray/<stage>`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from cdsp_core.pipeline import COMPLETE, StageFn, fetch_atomically
from cdsp_core.runner import DOWNLOAD_PREFIX, Runner, fetched, latest_run_checkpoint, list_checkpoints
from cdsp_core.spec import ExperimentSpec

RAY_STATE = "ray"
"""Folder of the run folder where Ray Train and Tune keep their own state."""
CONTROLLER_FAILURE_LIMIT_ENV = "CDSP_CONTROLLER_FAILURE_LIMIT"
DEFAULT_CONTROLLER_FAILURE_LIMIT = 10
"""Worker-group start failures tolerated per stage (one per ~60 s spent waiting for resources)."""


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
    names = sorted((Path(i.path).name for i in infos if i.is_file), key=runs.checkpoint_epoch)
    return next((n for n in reversed(names) if n.startswith(f"{stage}-epoch") and n.endswith(".pt")), None)


def latest_checkpoint(run: str, stage: str) -> Path | None:
    """Where a stage resumes: Ray's latest reported checkpoint, unless the run folder holds a newer one
    (rank 0 writes the run folder first, so a worker killed between that write and the report
    leaves the run folder one epoch ahead; resuming there avoids redoing, and re-logging, the epoch)."""
    ckpt = ray.train.get_checkpoint()
    name = _stage_file(ckpt, stage) if ckpt is not None else None
    newest = list_checkpoints(run, stage)
    if name is None or (newest and runs.checkpoint_epoch(newest[-1]) > runs.checkpoint_epoch(name)):
        return latest_run_checkpoint(run, stage)
    assert ckpt is not None
    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(ckpt.path) / name
    local = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX))
    ckpt.to_directory(str(local))
    return fetched(local / name)  # removed by load_checkpoint once read


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


def gather_labels(spec: ExperimentSpec, runner: Runner, run: str, local: Path) -> None:
    """The Runner's `gather_labels` on Ray. Rank 0 then publishes its own folder (uploading it when the run
    folder is on object storage), so on object storage every other rank uploads its share first.

    Not only the ranks of other nodes: which ranks share rank 0's folder is a property of their file
    systems, not of Ray's node ids (two nodes on one machine report one address and may share a
    node rank). The shares of rank 0's machine are uploaded twice; a missing label would be worse."""
    if runs.is_remote(run) and runner.rank > 0:
        upload_share(spec, runner, local, runs.join(run, runs.PSEUDO_LABELS))
    _barrier(runner)


def stage_worker(fn: StageFn, config: dict[str, Any]) -> dict[str, Any]:
    """`train_fn_per_worker`: the stage function `fn` on this worker, with the Ray Runner."""
    spec, run = ExperimentSpec.model_validate(config["spec"]), str(config["run"])
    runner = ray_runner(spec, run)
    runner.share_labels = partial(share_labels, spec, runner, run)
    runner.gather_labels = partial(gather_labels, spec, runner, run)
    if runner.is_main:  # what the group runs on, once in the job log
        group = dist.get_backend() if dist.is_initialized() else "none (one worker)"
        _log(f"{fn.__name__}: process group {group} on {runner.device}")
    return fn(spec, run, runner, **config["kwargs"])


# ---- the trainer (called by a driver) ------------------------------------------------------


def controller_failure_limit() -> int:
    return int(os.environ.get(CONTROLLER_FAILURE_LIMIT_ENV, DEFAULT_CONTROLLER_FAILURE_LIMIT))


class Trainer(TorchTrainer):
    """A TorchTrainer that leaves Ctrl-C to the driver. Ray's own handler aborts the run quietly and
    stays installed: `fit` then returned no value, so that an interrupted stage read as a broken one
    (exit 1) and later Ctrl-Cs went to a dead controller. Here it is a KeyboardInterrupt: `cdsp run`
    ends with `error: interrupted` (130) and the driver's Ray actors go with it."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None


def make_trainer(
    fn: StageFn, spec: ExperimentSpec, run: str, kwargs: dict[str, Any], callbacks: Sequence[Any] = ()
) -> TorchTrainer:
    """A TorchTrainer running the stage function `fn` with `kwargs`; `resources.*` of the spec become its
    scaling and failure configs.

    Its Ray name is the stage (the function's name), under `<run>/ray`: started again on the same run
    folder, Ray finds its snapshot and `get_checkpoint()` returns the stage's latest checkpoint.
    """
    res = spec.resources
    storage_path, filesystem = ray_storage(run)
    config = {"spec": spec.model_dump(mode="json"), "run": run, "kwargs": kwargs}
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    return Trainer(
        partial(stage_worker, fn),  # rank 0's return value becomes Result.return_value
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=res.placement.upper(),
        ),
        run_config=RunConfig(
            name=fn.__name__,
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


@dataclass
class RayLauncher:
    """The `cdsp_core.pipeline.Launcher` of the connected Ray cluster: each stage on a TorchTrainer of
    `resources.num_workers` workers; `callbacks` go to its RunConfig (a search trial's TuneReportCallback)."""

    callbacks: Sequence[Any] = ()
    lines: Callable[[str], None] | None = field(default=lambda line: print(line, flush=True))
    """Where the plan's progress lines go (None: nowhere)."""

    def log(self, line: str) -> None:
        if self.lines is not None:
            self.lines(line)

    def __call__(self, fn: StageFn, spec: ExperimentSpec, run: str, **kwargs: Any) -> dict[str, Any]:
        """Train one stage and return rank 0's return value; raises `ray.train.TrainingFailedError` once
        `resources.max_failures` are spent."""
        spec = worker_spec(spec)
        self.log(f"{fn.__name__}: {spec.resources.num_workers} Ray Train worker(s)")
        value = getattr(make_trainer(fn, spec, run, kwargs, self.callbacks).fit(), "return_value", None)
        if not isinstance(value, dict):
            raise RuntimeError(f"{fn.__name__}: the training function returned {value!r}, not a dict")
        return value
