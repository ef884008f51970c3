"""Request and response bodies of the REST API (what /openapi.json documents)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cdsp_core.spec import ExperimentSpec
from service.states import Status


class _Model(BaseModel):
    model_config = ConfigDict(from_attributes=True, use_attribute_docstrings=True)


class ExperimentCreate(_Model):
    """A new experiment: the spec and its place in the queue."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    spec: ExperimentSpec
    """The complete experiment spec (unknown fields are rejected)."""
    priority: int = Field(0, ge=-1000, le=1000)
    """Higher runs first; equal priorities run first in, first out."""


class TransitionOut(_Model):
    from_status: Status | None
    to_status: Status
    at: datetime
    attempt: int
    reason: str | None


class Progress(_Model):
    epochs_done: int
    epochs_total: int
    fraction: float
    """epochs_done / epochs_total, over the stages the spec runs."""
    stage: str | None
    """Stage of the latest metrics row (stage1, pseudo_labels, stage2)."""


class RayJob(_Model):
    submission_id: str | None
    """Ray submission id of the current attempt (the experiment id, then `{id}-r{n}`)."""
    dashboard_url: str | None
    """The job's page on the Ray dashboard."""


class ExperimentSummary(_Model):
    id: str
    name: str
    kind: str
    status: Status
    priority: int
    attempt: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    miou: float | None
    """Final validation mIoU in percent (succeeded experiments)."""
    error: str | None


class ExperimentOut(ExperimentSummary):
    queued_at: datetime
    cancel_requested: bool
    latest_metrics: dict[str, Any] | None
    result: dict[str, Any] | None
    """The run folder's result.json once the experiment succeeded."""
    ray: RayJob
    run_dir: str
    spec: dict[str, Any]
    transitions: list[TransitionOut]


class ExperimentPage(_Model):
    items: list[ExperimentSummary]
    total: int
    limit: int
    offset: int


class MetricsOut(_Model):
    experiment_id: str
    items: list[dict[str, Any]]
    """metrics.jsonl rows (each with its line number `seq`)."""


class TrialsOut(_Model):
    experiment_id: str
    trials: list[dict[str, Any]]
    """trials.json: one object per trial (trial, params, miou, status, checkpoint)."""
    best: dict[str, Any] | None
    """The best trial by the search metric and mode (from result.json when the search has finished)."""


class CheckpointOut(_Model):
    name: str
    size: int
    stage: str | None
    epoch: int | None
    url: str


class CheckpointList(_Model):
    experiment_id: str
    items: list[CheckpointOut]
    final: str | None
    """Name of the checkpoint result.json points at, once the experiment succeeded."""


class FigureList(_Model):
    experiment_id: str
    items: list[str]


class ErrorOut(_Model):
    detail: str
    """What went wrong, naming the offending id, file or token."""


class ConflictOut(ErrorOut):
    status: str
    """The experiment's current state, which does not allow the action."""


class Health(_Model):
    status: str


class Readiness(_Model):
    ready: bool
    database: str | None
    """None when reachable, else why not."""
    ray: str | None
    """None when reachable, else why not."""
    ray_address: str
