"""Experiments: submit, list, read, cancel, retry (issue items 2, 3 and 7)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Response, status
from sqlalchemy.exc import IntegrityError

from cdsp_core import runs
from cdsp_core.data.layout import check_layout
from cdsp_core.spec import ExperimentSpec
from service import runfolder, store, views
from service.deps import CtxDep, SessionDep, WriteSessionDep
from service.errors import InputError
from service.models import Experiment
from service.ray_jobs import JobNotFound, RayError, RayUnavailable
from service.schemas import ConflictOut, ErrorOut, ExperimentCreate, ExperimentOut, ExperimentPage
from service.settings import Settings
from service.states import ACTIVE, IllegalTransition, Status

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"
ExperimentId = Annotated[str, Path(pattern=ID_PATTERN, description="Experiment id, e.g. exp-3f2a9c1b7d4e.")]
IdempotencyKey = Annotated[
    str | None,
    Header(pattern=r"^[!-~]{1,255}$", description="A repeated POST with the same key returns the first experiment."),
]
RESPONSES: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "No experiment with that id"}}
ACTION_RESPONSES = RESPONSES | {409: {"model": ConflictOut, "description": "The state does not allow the action"}}


def dataset_problems(spec: ExperimentSpec, settings: Settings) -> list[tuple[str, str]]:
    """A dataset outside the operator's `dataset_roots`; else the layout problems of a dataset root this
    process can see (a root it cannot see is the cluster's to check)."""
    root = spec.data.root
    try:
        if settings.outside_dataset_roots(root):
            return [("data.root", "is outside the dataset roots this service accepts (CDSP_DATASET_ROOTS)")]
        for name in ("pseudo_label_dir", "distance_map_dir"):  # folders that may be given absolute
            folder = getattr(spec.data, name)
            try:
                outside = folder is not None and FsPath(folder).is_absolute() and settings.outside_dataset_roots(folder)
            except (OSError, ValueError) as exc:
                return [(f"data.{name}", f"not a usable path: {exc}")]
            if outside:
                return [(f"data.{name}", "is outside the dataset roots this service accepts (CDSP_DATASET_ROOTS)")]
    except (OSError, ValueError) as exc:
        return [("data.root", f"not a usable path: {exc}")]
    if runs.is_remote(root):
        return []
    try:
        visible = FsPath(root).expanduser().exists()
        problems = check_layout(spec.data, need_pseudo=spec.data.pseudo_label_dir is not None) if visible else []
    except (OSError, ValueError) as exc:  # e.g. a NUL byte in the path
        return [("data.root", f"not a usable path: {exc}")]
    return [(p.field, str(p)) for p in problems]


# Far beyond any real run, and within a 32-bit integer column on PostgreSQL.
MAX_TOTAL_EPOCHS = 1_000_000


def size_problems(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """Specs too large to track (the spec itself puts no upper bound on epochs or trials)."""
    total = runfolder.total_epochs(spec)
    if total <= MAX_TOTAL_EPOCHS:
        return []
    field = "stage1.epochs" if spec.stage1.epochs > MAX_TOTAL_EPOCHS else "stage2.epochs"
    if spec.kind == "search" and spec.stage2.epochs <= MAX_TOTAL_EPOCHS and spec.stage1.epochs <= MAX_TOTAL_EPOCHS:
        field = "search.space"
    return [(field, f"the experiment would run {total} epochs in total; at most {MAX_TOTAL_EPOCHS} are accepted")]


def _fingerprint(body: ExperimentCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ExperimentOut,
    responses={
        201: {"description": "Queued; `Location` names the new experiment"},
        400: {"model": ErrorOut, "description": "The body is not valid JSON"},
    },
)
def create_experiment(
    body: ExperimentCreate,
    ctx: CtxDep,
    session: WriteSessionDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ExperimentOut:
    """Queue an experiment. A dataset root the service can see must hold the VOC/ScribbleSup layout."""
    fingerprint = _fingerprint(body)
    if idempotency_key and (first := store.by_idempotency_key(session, idempotency_key)) is not None:
        return _replay(first, fingerprint, ctx, session, response)
    if too_big := size_problems(body.spec):
        raise InputError([(["body", "spec", *field.split(".")], msg, "value_error") for field, msg in too_big])
    if problems := dataset_problems(body.spec, ctx.settings):
        raise InputError([(["body", "spec", *field.split(".")], msg, "dataset_layout") for field, msg in problems])
    exp = store.new_experiment(
        body.spec, body.priority, ctx.settings.run_dir, runfolder.total_epochs(body.spec), idempotency_key, fingerprint
    )
    try:
        store.add(session, exp, ctx.settings.replica_id)
        session.commit()
    except IntegrityError:  # the same Idempotency-Key raced us to the insert
        session.rollback()
        first = store.by_idempotency_key(session, idempotency_key or "")
        if first is None:
            raise
        return _replay(first, fingerprint, ctx, session, response)
    if ctx.loop is not None:
        ctx.loop.wake()
    response.headers["Location"] = f"{router.prefix}/{exp.id}"
    return views.detail(exp, store.transitions(session, exp.id), ctx)


def _replay(
    first: Experiment, fingerprint: str, ctx: CtxDep, session: WriteSessionDep, response: Response
) -> ExperimentOut:
    if first.request_hash != fingerprint:
        reused = (
            ["header", "Idempotency-Key"],
            "this key was already used with another body",
            "idempotency_key_reused",
        )
        raise InputError([reused])
    response.headers["Location"] = f"{router.prefix}/{first.id}"
    response.headers["Idempotent-Replayed"] = "true"
    return views.detail(first, store.transitions(session, first.id), ctx)


@router.get("", response_model=ExperimentPage)
def list_experiments(
    session: SessionDep,
    status_: Annotated[list[Status] | None, Query(alias="status", description="Repeat to match several.")] = None,
    kind: Annotated[Literal["pipeline", "stage1", "stage2", "search"] | None, Query()] = None,
    name: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> ExperimentPage:
    """Experiments, newest first, filtered by status, kind and exact name."""
    items, total = store.search(session, status_ or (), kind, name, limit, offset)
    return ExperimentPage(items=[views.summary(e) for e in items], total=total, limit=limit, offset=offset)


@router.get("/{experiment_id}", response_model=ExperimentOut, responses=RESPONSES)
def get_experiment(experiment_id: ExperimentId, ctx: CtxDep, session: SessionDep) -> ExperimentOut:
    """Status, transitions with their times, progress, latest metrics, result, Ray job and error."""
    exp = store.get(session, experiment_id)
    return views.detail(exp, store.transitions(session, experiment_id), ctx)


@router.post(
    "/{experiment_id}/cancel",
    response_model=ExperimentOut,
    responses=ACTION_RESPONSES | {202: {"description": "Stop requested from Ray; the state follows"}},
)
def cancel_experiment(
    experiment_id: ExperimentId, ctx: CtxDep, session: WriteSessionDep, response: Response
) -> ExperimentOut:
    """Cancel: a queued experiment at once (200); a dispatched one by stopping its Ray job (202)."""
    for _ in range(3):  # the state may change under us (a claim, the job ending): re-read and retry
        exp = store.get(session, experiment_id)
        if exp.status == Status.queued:
            if store.transition(
                session,
                exp.id,
                Status.cancelled,
                "cancelled by request",
                ctx.settings.replica_id,
                expect=[Status.queued],
            ):
                session.commit()
                break
        elif exp.status in ACTIVE:
            if store.ask_cancel(session, exp.id):  # still active: it may have ended since the read
                session.commit()
                _stop(ctx, exp.submission_id if exp.submitted_at else None)
                response.status_code = status.HTTP_202_ACCEPTED
                break
        else:
            raise IllegalTransition(exp.id, exp.status, "cancel", frozenset({Status.queued, *ACTIVE}))
        session.rollback()
    session.expire_all()
    return views.detail(store.get(session, experiment_id), store.transitions(session, experiment_id), ctx)


def _stop(ctx: CtxDep, submission_id: str | None) -> None:
    """Best effort: the reconciler asks Ray again on every pass until the job has stopped."""
    if submission_id is None:
        return
    with contextlib.suppress(RayUnavailable, RayError, JobNotFound):
        ctx.ray.stop(submission_id)


@router.post("/{experiment_id}/retry", response_model=ExperimentOut, responses=ACTION_RESPONSES)
def retry_experiment(experiment_id: ExperimentId, ctx: CtxDep, session: WriteSessionDep) -> ExperimentOut:
    """Queue a failed or cancelled experiment again; the job resumes from its latest checkpoint."""
    exp = store.get(session, experiment_id)
    retryable = frozenset({Status.failed, Status.cancelled})
    if exp.status not in retryable:
        raise IllegalTransition(exp.id, exp.status, "retry", retryable)
    moved = store.transition(
        session,
        exp.id,
        Status.queued,
        f"retry {exp.attempt + 1}",
        ctx.settings.replica_id,
        expect=[Status.failed, Status.cancelled],
        attempt=exp.attempt + 1,
        submission_id=None,
        claimed_by=None,
        claimed_at=None,
        submitted_at=None,
        cancel_requested=False,
        error=None,
        started_at=None,
        finished_at=None,
        result=None,
    )
    if not moved:  # another request retried it first
        session.rollback()
        raise IllegalTransition(exp.id, store.get(session, experiment_id).status, "retry", retryable)
    session.commit()
    if ctx.loop is not None:
        ctx.loop.wake()
    session.expire_all()
    return views.detail(store.get(session, experiment_id), store.transitions(session, experiment_id), ctx)


def add_links(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI links (in place) from every answer that describes one experiment (create, cancel, retry)
    to each operation on it, `experiment_id` taken from the answer's `id`: generated clients and
    stateful API tests (schemathesis) follow them from a created experiment to its other operations."""
    paths = schema.get("paths", {})
    one = f"{router.prefix}/{{experiment_id}}"
    targets = sorted(op["operationId"] for path, ops in paths.items() if path.startswith(one) for op in ops.values())
    links = {t: {"operationId": t, "parameters": {"experiment_id": "$response.body#/id"}} for t in targets}
    producers = [paths.get(path, {}).get("post") for path in (router.prefix, f"{one}/cancel", f"{one}/retry")]
    for op in filter(None, producers):
        for code, answer in op["responses"].items():
            if code in ("200", "201", "202"):
                answer["links"] = links
    return schema
