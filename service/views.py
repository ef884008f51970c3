"""Building response bodies from rows (kept apart from the routes so they stay short)."""

from __future__ import annotations

from typing import Any

from service.context import AppContext
from service.models import Experiment, Transition
from service.schemas import ExperimentOut, ExperimentSummary, Progress, RayJob, TransitionOut
from service.states import Status


def progress(exp: Experiment) -> Progress:
    total = exp.epochs_total
    done = total if exp.status == Status.succeeded else min(exp.epochs_done, total)
    return Progress(
        epochs_done=done, epochs_total=total, fraction=round(done / total, 4) if total else 0.0, stage=exp.stage
    )


def _miou(exp: Experiment) -> float | None:
    value = (exp.result or {}).get("miou")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def summary(exp: Experiment) -> ExperimentSummary:
    return ExperimentSummary(
        id=exp.id,
        name=exp.name,
        kind=exp.kind,
        status=Status(exp.status),
        priority=exp.priority,
        attempt=exp.attempt,
        created_at=exp.created_at,
        updated_at=exp.updated_at,
        started_at=exp.started_at,
        finished_at=exp.finished_at,
        progress=progress(exp),
        miou=_miou(exp),
        error=exp.error,
    )


def detail(exp: Experiment, transitions: list[Transition], ctx: AppContext) -> ExperimentOut:
    sid = exp.submission_id
    return ExperimentOut(
        **summary(exp).model_dump(),
        queued_at=exp.queued_at,
        cancel_requested=exp.cancel_requested,
        latest_metrics=exp.latest_metrics,
        result=exp.result,
        ray=RayJob(submission_id=sid, dashboard_url=ctx.ray.job_url(sid) if sid else None),
        run_dir=exp.run_dir,
        spec=exp.spec,
        transitions=[TransitionOut.model_validate(t) for t in transitions],
    )


def best_trial(trials: list[dict[str, Any]], result: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    """The best trial: result.json's `best_trial` when the search has finished, else by mIoU so far."""
    scored = [t for t in trials if isinstance(t.get("miou"), int | float) and not isinstance(t.get("miou"), bool)]
    if result and "best_trial" in result:
        named = [t for t in trials if t.get("trial") == result["best_trial"]]
        if named:
            return named[0]
        return {"trial": result["best_trial"], "params": result.get("params"), "miou": result.get("miou")}
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: float(t["miou"]))
