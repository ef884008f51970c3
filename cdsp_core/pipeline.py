"""The whole method in one process: stage 1 (or external pseudo-labels), stage 2, evaluation.

`cdsp run` calls `run_pipeline`. The Ray driver in `workers/` runs the same steps (the
functions below) inside Ray Train workers. Everything lands in the run folder (`cdsp_core.runs`).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from cdsp_core import runs
from cdsp_core.cam import generate_pseudo_labels, label_quality, quality_row
from cdsp_core.data.layout import Layout, require_layout
from cdsp_core.data.scribbles import scribble_folder
from cdsp_core.engine import (
    build_stage1_model,
    stage1_checkpoint,
    stage1_name,
    train_classifier,
    train_segmentor,
)
from cdsp_core.runner import Runner, append_metrics, default_device, latest_run_checkpoint, load_checkpoint
from cdsp_core.runs import QUALITY_KEYS
from cdsp_core.spec import ExperimentSpec

COMPLETE = ".complete"


def prepare_run(spec: ExperimentSpec, run: str, is_main: bool = True) -> Path:
    """Write spec.yaml, refuse a dataset that does not hold the layout, return the scribble folder."""
    if is_main:
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
    if runs.is_remote(run):  # the labels first: the marker promises that they are all there
        runs.upload(local, runs.join(run, runs.PSEUDO_LABELS))
    (local / COMPLETE).write_text("ok\n")
    if runs.is_remote(run):
        runs.upload(local / COMPLETE, runs.join(run, runs.PSEUDO_LABELS, COMPLETE))


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


def stage1(
    spec: ExperimentSpec, runner: Runner, *, scribble_dir: Path, out_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 1 on this rank: the classifier, then its pseudo-labels for this rank's share of the ids.

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


def run_pipeline(spec: ExperimentSpec, out: str, runner: Runner | None = None, figures: bool = True) -> dict[str, Any]:
    """Run the experiment in this process and write the run folder; returns result.json's content.

    Running it again on the same folder resumes: finished pseudo-labels are reused and each stage
    continues after its latest checkpoint.
    """
    if spec.kind == "search":
        raise ValueError("kind 'search' runs trials on Ray: use `cdsp run CONFIG --ray`")
    runner = runner or Runner(run=out, device=default_device(spec.resources.use_gpu))
    start = time.perf_counter()
    scribble_dir = prepare_run(spec, out, runner.is_main)
    result = runs.RunResult(spec.name, spec.kind)
    classifier: nn.Module | None = None
    pseudo_dir: Path | None = None
    if spec.data.pseudo_label_dir is not None:
        pseudo_dir = Layout.from_spec(spec.data).pseudo_label_dir
        assert pseudo_dir is not None
        result.set_quality(quality_row(label_quality(spec, pseudo_dir, scribble_dir, runner)))
    elif spec.runs_stage1:
        done = finished_pseudo_labels(out)
        if done is not None:
            pseudo_dir, recorded = done
            result.set_quality(recorded)
        else:
            pseudo_dir = pseudo_label_dir(out)
            classifier, row = stage1(spec, runner, scribble_dir=scribble_dir, out_dir=pseudo_dir)
            result.set_quality(row)
            if runner.is_main:
                publish_pseudo_labels(out, pseudo_dir, row)
                if runner.verbose:
                    runner.log(f"pseudo-labels -> {pseudo_dir}: {runs.describe_quality(row)}")
        result.epochs["stage1"] = spec.stage1.total_epochs
    model = None
    if spec.kind == "stage1":
        result.checkpoint = stage1_checkpoint(spec)
    else:
        model, final = train_segmentor(spec, runner, scribble_dir=scribble_dir, pseudo_dir=pseudo_dir)
        result.set_final(final)
        result.epochs["stage2"] = spec.stage2.epochs
    result.duration_s = round(time.perf_counter() - start, 2)
    if runner.is_main:
        if figures:
            from cdsp_core.figures import run_figures

            if classifier is None and spec.runs_stage1:
                classifier = load_stage1_model(spec, out)
            run_figures(spec, out, model, classifier, pseudo_dir, scribble_dir, runner.device)
        runs.write_result(out, result)
    return result.to_dict()
