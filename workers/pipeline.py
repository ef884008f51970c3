"""The Ray pipeline driver: stage 1 on a TorchTrainer (and its pseudo-labels, split across the
workers), stage 2 on another, evaluation, and the run folder, under a local path or a storage URI.

It runs the same engine steps as `cdsp_core.pipeline.run_pipeline` and writes the same run folder.
Started again on the same folder it resumes: finished pseudo-labels are reused, each stage goes on
after its latest checkpoint, and a complete run is returned as it is, without touching Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from cdsp_core import runs
from cdsp_core.cam import label_quality, quality_row
from cdsp_core.data.layout import Layout
from cdsp_core.data.scribbles import scribble_folder
from cdsp_core.engine import stage1_checkpoint
from cdsp_core.pipeline import COMPLETE, prepare_run, recorded_quality
from cdsp_core.runner import Runner
from cdsp_core.spec import ExperimentSpec
from workers.preflight import finished_result
from workers.train import run_stage, stage1_worker, stage2_worker, worker_spec

Log = Callable[[str], None]


def pseudo_labels_done(run: str) -> bool:
    return runs.exists(runs.join(run, runs.PSEUDO_LABELS, COMPLETE))


def external_quality(spec: ExperimentSpec, run: str) -> dict[str, Any]:
    """Quality of external pseudo-labels against the training ground truth (in this process)."""
    folder = Layout.from_spec(spec.data).pseudo_label_dir
    assert folder is not None
    return quality_row(label_quality(spec, folder, scribble_folder(spec.data), Runner(run=run, progress=False)))


def ensure_pseudo_labels(spec: ExperimentSpec, run: str, log: Log, figures: bool) -> dict[str, Any]:
    """Stage 1 on Ray unless `run` already holds finished pseudo-labels; returns their quality."""
    if pseudo_labels_done(run):
        log(f"stage 1: reusing the finished pseudo-labels in {runs.join(run, runs.PSEUDO_LABELS)}")
    else:
        log(f"stage 1: {spec.resources.num_workers} worker(s), {spec.stage1.total_epochs} epoch(s)")
        run_stage(stage1_worker, "stage1", spec, run, figures=figures)
    return {**quality_row(None), **recorded_quality(run)}


def run_on_ray(spec: ExperimentSpec, out: str, log: Log = print) -> dict[str, Any]:
    """Run a `pipeline`, `stage1` or `stage2` experiment on the connected Ray cluster; returns result.json."""
    if spec.kind == "search":
        raise ValueError("kind 'search' runs through workers.search.run_search")
    done = finished_result(spec, out)
    if done is not None:
        log(f"{out} already holds the finished run")
        return done
    start = time.perf_counter()
    prepare_run(spec, out)  # spec.yaml, and DatasetError before any training
    wspec = worker_spec(spec)
    result = runs.RunResult(spec.name, spec.kind)
    if spec.data.pseudo_label_dir is not None:
        result.set_quality(external_quality(wspec, out))
    elif spec.runs_stage1:
        result.set_quality(ensure_pseudo_labels(wspec, out, log, figures=spec.kind == "stage1"))
        result.epochs["stage1"] = spec.stage1.total_epochs
    if spec.kind == "stage1":
        result.checkpoint = stage1_checkpoint(spec)
    else:
        log(f"stage 2: {spec.resources.num_workers} worker(s), {spec.stage2.epochs} epoch(s)")
        result.set_final(run_stage(stage2_worker, "stage2", wspec, out, pseudo_from=out))
        result.epochs["stage2"] = spec.stage2.epochs
    result.duration_s = round(time.perf_counter() - start, 2)
    return runs.write_result(out, result)
