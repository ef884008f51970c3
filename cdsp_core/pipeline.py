"""The stage plan, written once: external pseudo-labels or stage 1 (or its finished labels), stage 2,
evaluation, result.json.

`run_pipeline(spec, out, launch)` is the plan. The stage functions `stage1` and `stage2` run on every
rank of whatever hosts them and do not know which: `InProcess` (`cdsp run`) calls them here with a
plain `Runner`; `workers.train.RayLauncher` (`cdsp run --ray`, the service's jobs, search trials) runs
them under a TorchTrainer with a Runner whose hooks are Ray's. Everything lands in the run folder
(`cdsp_core.runs`), the same folder whichever launcher ran it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from cdsp_core import runs
from cdsp_core.cam import generate_pseudo_labels, label_quality, quality_row
from cdsp_core.classifier import build_stage1_model, stage1_checkpoint, stage1_name, train_classifier
from cdsp_core.data.layout import Layout, check_dataset, require_layout
from cdsp_core.data.scribbles import scribble_folder
from cdsp_core.runner import Runner, append_metrics, default_device, latest_run_checkpoint, load_checkpoint
from cdsp_core.runs import QUALITY_KEYS
from cdsp_core.segmentor import train_segmentor
from cdsp_core.spec import ExperimentSpec

COMPLETE = ".complete"


def prepare_run(spec: ExperimentSpec, run: str, is_main: bool = True) -> Path:
    """Return the scribble folder of a dataset that holds the layout (DatasetError otherwise). The driver
    (`is_main`) also refuses a split too small for a batch (`check_dataset`) and writes spec.yaml; the
    ranks of a stage only look the layout up, checked once per process."""
    if is_main:
        check_dataset(spec)
        runs.write_text(runs.join(run, runs.SPEC), spec.to_yaml())
    require_layout(spec.data)
    return scribble_folder(spec.data)


def pseudo_label_dir(run: str) -> Path:
    """Where this process writes/reads the run's pseudo-labels: the run folder itself when it is
    local, otherwise a local cache mirrored to `run/pseudo_labels`."""
    if not runs.is_remote(run):
        return runs.local_path(runs.join(run, runs.PSEUDO_LABELS))
    key = hashlib.sha1(run.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "cdsp-pseudo" / key


def recorded_quality(run: str) -> dict[str, Any]:
    """The pseudo-label quality row that stage 1 recorded in metrics.jsonl (QUALITY_KEYS), else {}."""
    found: dict[str, Any] = {}
    for row in runs.read_jsonl(runs.join(run, runs.METRICS)):
        if row.get("stage") == "pseudo_labels":
            found = {k: row.get(k) for k in QUALITY_KEYS}
    return found


def finished_pseudo_labels(run: str) -> tuple[Path, dict[str, Any]] | None:
    """Pseudo-labels a previous attempt completed (fetched locally), with their recorded quality."""
    location = runs.join(run, runs.PSEUDO_LABELS)
    if not runs.exists(runs.join(location, COMPLETE)):
        return None
    local = pseudo_label_dir(run)
    if runs.is_remote(run) and not (local / COMPLETE).is_file():
        fetch_atomically(location, local)
    return local, recorded_quality(run)


def publish_pseudo_labels(run: str, local: Path, row: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its share: record quality and timing, mark complete, mirror if remote."""
    append_metrics(run, {"stage": "pseudo_labels", **row, "time": time.time()})
    if not runs.is_remote(run):
        (local / COMPLETE).write_text("ok\n")
        return
    # The labels first: the marker promises that they are all there. This node's cache may hold only
    # its own ranks' shares (ranks on other nodes uploaded theirs), so it is not marked complete here:
    # a cache becomes complete only by a whole fetch (`finished_pseudo_labels`).
    runs.upload(local, runs.join(run, runs.PSEUDO_LABELS))
    runs.write_text(runs.join(run, runs.PSEUDO_LABELS, COMPLETE), "ok\n")


def fetch_atomically(location: str, local: Path) -> None:
    """Download a finished pseudo-label folder to `local` under a file lock, into a temporary folder
    renamed into place, so that processes sharing this machine (Ray workers, search trials) fetch
    it once and never read a half-fetched folder."""
    import os
    import shutil

    from filelock import FileLock

    local.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(local.parent / f".{local.name}.lock"):
        if (local / COMPLETE).is_file():  # another process fetched it meanwhile
            return
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=local.parent))
        try:
            runs.download(location, tmp)
            shutil.rmtree(local, ignore_errors=True)  # a partial local copy (an interrupted stage 1)
            os.rename(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def label_rounds(
    spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path, out_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 1's rounds on this rank: the classifier, then its pseudo-labels for this rank's share of the ids.

    With `stage1.rounds` > 1, each later round fine-tunes the classifier on the previous round's
    pseudo-labels (written next to `out_dir`, gathered by `runner.share_labels`) and labels again;
    every round's quality is a `pseudo_labels` row of metrics.jsonl, the last one's published by the
    caller. Returns the last classifier and that row (quality over all ranks and this rank's timing).
    """
    rounds = spec.stage1.rounds
    model: nn.Module | None = None
    previous: Path | None = None
    row: dict[str, Any] = {}
    for round_ in range(1, rounds + 1):
        model = train_classifier(
            spec, runner, scribble_dir=scribble_dir, round_=round_, labels_dir=previous, init=model
        )
        target = out_dir if round_ == rounds else out_dir.with_name(f"{out_dir.name}-round{round_}")
        quality, timing = generate_pseudo_labels(model, spec, runner, scribble_dir=scribble_dir, out_dir=target)
        row = {"round": round_, **quality_row(quality), **timing}
        if round_ < rounds:
            if runner.is_main:
                append_metrics(runner.run, {"stage": "pseudo_labels", **row, "time": time.time()})
                if runner.verbose:
                    runner.log(f"stage 1, round {round_}: {runs.describe_quality(row)}")
            runner.share_labels(target)
            previous = target
    assert model is not None
    return model, row


def load_stage1_model(spec: ExperimentSpec, run: str) -> nn.Module | None:
    """The classifier from the run's last stage-1 checkpoint, if there is one."""
    path = latest_run_checkpoint(run, stage1_name(spec.stage1.rounds))
    if path is None:
        return None
    model = build_stage1_model(spec, pretrained=False)
    model.load_state_dict(load_checkpoint(path)["model"])
    return model


def external_quality(spec: ExperimentSpec, run: str) -> dict[str, Any]:
    """Quality of the spec's external pseudo-labels against the training ground truth (in this process)."""
    folder = Layout.from_spec(spec.data).pseudo_label_dir
    assert folder is not None
    return quality_row(label_quality(spec, folder, scribble_folder(spec.data), Runner(run=run, progress=False)))


def stage_pseudo_dir(spec: ExperimentSpec, pseudo_from: str | None) -> Path | None:
    """The pseudo-label folder stage 2 reads on this machine: external ones, the finished stage-1 output
    of the run folder `pseudo_from` (fetched once per machine when remote), or none."""
    if spec.data.pseudo_label_dir is not None:
        return Layout.from_spec(spec.data).pseudo_label_dir
    if not spec.needs_pseudo_labels:
        return None
    done = finished_pseudo_labels(pseudo_from) if pseudo_from else None
    if done is None:
        raise RuntimeError(f"stage 2 needs pseudo-labels but {pseudo_from} holds no finished ones")
    return done[0]


# ---- the stage functions: run on every rank, wherever they are launched ---------------------------


def stage1(spec: ExperimentSpec, run: str, runner: Runner, *, figures: bool = False) -> dict[str, Any]:
    """Stage 1 on this rank: every round (`label_rounds`); once every rank wrote its share
    (`runner.gather_labels`), rank 0 publishes the labels and their quality row. Returns the quality."""
    scribble_dir = prepare_run(spec, run, is_main=False)
    out_dir = pseudo_label_dir(run)
    model, row = label_rounds(spec, runner, scribble_dir=scribble_dir, out_dir=out_dir)
    runner.gather_labels(out_dir)
    if runner.is_main:
        publish_pseudo_labels(run, out_dir, row)
        if runner.verbose:
            runner.log(f"pseudo-labels -> {runs.join(run, runs.PSEUDO_LABELS)}: {runs.describe_quality(row)}")
        if figures:
            from cdsp_core.figures import run_figures

            run_figures(spec, run, None, model, out_dir, scribble_dir, runner.device)
    return {k: row[k] for k in QUALITY_KEYS}


def stage2(
    spec: ExperimentSpec, run: str, runner: Runner, *, pseudo_from: str | None = None, figures: bool = True
) -> dict[str, Any]:
    """Stage 2 on this rank, reading the pseudo-labels of `stage_pseudo_dir`; rank 0 draws the figures.
    Returns the final evaluation (mIoU, per-class IoU, checkpoint, epochs)."""
    scribble_dir = prepare_run(spec, run, is_main=False)
    pseudo_dir = stage_pseudo_dir(spec, pseudo_from)
    model, final = train_segmentor(spec, runner, scribble_dir=scribble_dir, pseudo_dir=pseudo_dir)
    if runner.is_main and figures:
        from cdsp_core.figures import run_figures

        external = spec.data.pseudo_label_dir is not None
        classifier = load_stage1_model(spec, pseudo_from) if pseudo_from and not external else None
        run_figures(spec, run, model, classifier, pseudo_dir, scribble_dir, runner.device)
    return {k: final[k] for k in ("miou", "per_class_iou", "checkpoint", "epochs")}


StageFn = Callable[..., dict[str, Any]]


class Launcher(Protocol):
    """Runs a stage function (`stage1`, `stage2`) for a run folder on every rank of its host and
    returns rank 0's return value; `log` takes the plan's progress lines."""

    def log(self, line: str) -> None: ...

    def __call__(self, fn: StageFn, spec: ExperimentSpec, run: str, **kwargs: Any) -> dict[str, Any]: ...


@dataclass
class InProcess:
    """The launcher of `cdsp run`: the stage functions in this process, with this Runner's hooks."""

    runner: Runner

    def log(self, line: str) -> None:
        if self.runner.verbose:
            self.runner.log(line)

    def __call__(self, fn: StageFn, spec: ExperimentSpec, run: str, **kwargs: Any) -> dict[str, Any]:
        return fn(spec, run, dataclasses.replace(self.runner, run=run), **kwargs)


# ---- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PseudoLabels:
    """What stage 2 reads: `source` is the run folder holding finished stage-1 labels (None for external
    labels or none), `quality` their QUALITY_KEYS (empty without ground truth or labels)."""

    source: str | None
    quality: dict[str, Any]


def pseudo_labels(spec: ExperimentSpec, out: str, launch: Launcher, *, figures: bool = False) -> PseudoLabels:
    """The pseudo-labels of a run: external ones (measured here), the finished stage-1 labels `out` already
    holds, or stage 1 launched now; none when stage 2 reads none."""
    if spec.data.pseudo_label_dir is not None:
        return PseudoLabels(None, external_quality(spec, out))
    if not spec.runs_stage1:
        return PseudoLabels(None, {})
    if runs.exists(runs.join(out, runs.PSEUDO_LABELS, COMPLETE)):
        launch.log(f"stage 1: reusing the finished pseudo-labels in {runs.join(out, runs.PSEUDO_LABELS)}")
    else:
        launch.log(f"stage 1: {spec.stage1.total_epochs} epoch(s)")
        launch(stage1, spec, out, figures=figures)
    return PseudoLabels(out, recorded_quality(out))


def run_pipeline(
    spec: ExperimentSpec,
    out: str,
    launch: Launcher | Runner | None = None,
    *,
    figures: bool = True,
    labels: PseudoLabels | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Run a `pipeline`, `stage1` or `stage2` experiment into the run folder `out`; returns result.json.

    `launch` runs the stages (default: `InProcess`; a Runner is wrapped in one). `labels` hands stage 2
    pseudo-labels made elsewhere (a search's, shared by its trials) instead of the spec's own; `fields`
    go to the RunResult (a trial's name and params). A folder holding this spec's result is answered as
    it is; any other is resumed: finished pseudo-labels are reused, each stage continues after its
    latest checkpoint.
    """
    if spec.kind == "search":
        raise ValueError("kind 'search' runs trials on Ray: use `cdsp run CONFIG --ray`")
    launcher = (
        launch
        if launch is not None and not isinstance(launch, Runner)
        else InProcess(launch or Runner(run=out, device=default_device(spec.resources.use_gpu)))
    )
    done = runs.finished_result(spec, out)
    if done is not None:
        launcher.log(f"{out} already holds the finished run")
        return done
    start = time.perf_counter()
    prepare_run(spec, out)  # spec.yaml, and DatasetError before any training
    result = runs.RunResult(spec.name, spec.kind, **fields)
    if labels is None:
        labels = pseudo_labels(spec, out, launcher, figures=figures and spec.kind == "stage1")
        if spec.runs_stage1:
            result.epochs["stage1"] = spec.stage1.total_epochs
    result.set_quality(labels.quality)
    if spec.kind == "stage1":
        result.checkpoint = stage1_checkpoint(spec)
    else:
        launcher.log(f"stage 2: {spec.stage2.epochs} epoch(s)")
        result.set_final(launcher(stage2, spec, out, pseudo_from=labels.source, figures=figures))
        result.epochs["stage2"] = spec.stage2.epochs
    result.duration_s = round(time.perf_counter() - start, 2)
    return runs.write_result(out, result)
