"""What a run produced: metrics, trials, logs, checkpoints and figures (issue item 2)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import PlainTextResponse, StreamingResponse

from cdsp_core import runs
from service import runfolder, store, views
from service.context import AppContext
from service.deps import CtxDep, SessionDep
from service.models import Experiment
from service.ray_jobs import JobNotFound, RayError, RayUnavailable
from service.routes.experiments import RESPONSES, ExperimentId
from service.schemas import CheckpointList, CheckpointOut, ErrorOut, FigureList, MetricsOut, TrialsOut
from service.states import FINAL

router = APIRouter(prefix="/v1/experiments/{experiment_id}", tags=["artifacts"])
KEEPALIVE = "\0"
FileName = Annotated[str, Path(pattern=runfolder.SAFE_NAME.pattern, description="A file name from the listing.")]


@router.get("/metrics", response_model=MetricsOut, responses=RESPONSES)
def get_metrics(
    experiment_id: ExperimentId,
    session: SessionDep,
    stage: Annotated[str | None, Query(pattern=r"^[a-z0-9_]{1,32}$", description="stage1, stage2...")] = None,
    since: Annotated[int, Query(ge=0, le=1_000_000_000, description="First row (line number) to return.")] = 0,
) -> MetricsOut:
    """The metrics.jsonl rows stored so far, in order."""
    store.get(session, experiment_id)
    rows = store.metric_rows(session, experiment_id, stage, since)
    return MetricsOut(experiment_id=experiment_id, items=[{"seq": r.seq, **r.data} for r in rows])


@router.get("/trials", response_model=TrialsOut, responses=RESPONSES)
def get_trials(experiment_id: ExperimentId, session: SessionDep) -> TrialsOut:
    """A search's trials (one row each) and the best one; 404 for an experiment that is not a search."""
    exp = store.get(session, experiment_id)
    if exp.kind != "search":
        raise HTTPException(404, f"experiment {experiment_id} is a {exp.kind}, not a search: it has no trials")
    trials = exp.trials or []
    mode = (exp.spec.get("search") or {}).get("mode", "max")
    return TrialsOut(experiment_id=exp.id, trials=trials, best=views.best_trial(trials, exp.result, mode))


def _read_logs(ctx: AppContext, exp: Experiment) -> str:
    """The current attempt's logs: the archived copy once the job ended, else live from Ray."""
    sid = exp.submission_id
    if sid is None:
        return ""
    archived = runfolder.log_location(exp.run_dir, sid)
    if exp.status in FINAL and runs.exists(archived):
        return runs.read_text(archived)
    try:
        return ctx.ray.logs(sid)
    except (JobNotFound, RayError):
        return runs.read_text(archived) if runs.exists(archived) else ""


def _tail(text: str, lines: int) -> str:
    if lines <= 0:
        return text
    kept = text.splitlines(keepends=True)[-lines:]
    return "".join(kept)


@router.get(
    "/logs",
    response_model=None,
    responses=RESPONSES
    | {
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Logs"},
        503: {"model": ErrorOut, "description": "Ray is unreachable and the logs are not archived yet"},
    },
)
def get_logs(
    experiment_id: ExperimentId,
    ctx: CtxDep,
    session: SessionDep,
    tail: Annotated[int, Query(ge=0, le=1_000_000, description="Last N lines; 0 = all.")] = 200,
    follow: Annotated[bool, Query(description="Keep streaming new lines until the experiment ends.")] = False,
) -> PlainTextResponse | StreamingResponse:
    """The job's stdout/stderr (current attempt): a tail, or followed as a text stream."""
    exp = store.get(session, experiment_id)
    if not follow:
        return PlainTextResponse(_tail(_read_logs(ctx, exp), tail), headers={"X-Experiment-Status": exp.status})
    session.close()  # the stream may last hours: hold no transaction meanwhile
    return StreamingResponse(_follow(ctx, experiment_id, tail), media_type="text/plain; charset=utf-8")


async def _follow(ctx: AppContext, experiment_id: str, tail: int) -> AsyncIterator[str]:
    """Poll the logs once a second and send what is new; ends once the experiment is final.

    Polling works the same before the job starts, while Ray runs it and after its logs were
    archived (when the Ray head may be gone), and survives a retry (a new attempt, a new log).
    After `log_keepalive` seconds without new text it sends KEEPALIVE, a NUL byte clients drop.
    """
    sent, sid, first = 0, None, True
    quiet_since = time.monotonic()
    while True:
        exp = await asyncio.to_thread(_load, ctx, experiment_id)
        if exp.submission_id != sid:
            sid, sent = exp.submission_id, 0
        try:
            text = await asyncio.to_thread(_read_logs, ctx, exp)
        except RayUnavailable as exc:  # keep the stream open through a Ray outage, while the job may run
            if exp.status in FINAL:  # ended with no archived logs (lost with its cluster): nothing will come
                yield f"[no more logs: experiment {exp.id} has ended and its logs were not archived; {exc}]\n"
                return
            text = None
        if text is not None:
            chunk = _tail(text, tail) if first else text[sent:]
            first, sent = False, len(text)
            if chunk:
                yield chunk
                quiet_since = time.monotonic()
            if exp.status in FINAL:
                return
        if time.monotonic() - quiet_since >= ctx.settings.log_keepalive:
            yield KEEPALIVE  # nothing new: keep clients with read timeouts (and proxies) from dropping the stream
            quiet_since = time.monotonic()
        await asyncio.sleep(min(1.0, ctx.settings.log_keepalive))


def _load(ctx: AppContext, experiment_id: str) -> Experiment:
    with ctx.readers() as s:
        return store.get(s, experiment_id)


@router.get("/checkpoints", response_model=CheckpointList, responses=RESPONSES)
def list_checkpoints(experiment_id: ExperimentId, session: SessionDep) -> CheckpointList:
    """Checkpoints in the run folder (name, size, stage, epoch) and the final one."""
    exp = store.get(session, experiment_id)
    items = [
        CheckpointOut(**c, url=f"{router.prefix.format(experiment_id=exp.id)}/checkpoints/{c['name']}")
        for c in runfolder.checkpoints(exp.run_dir)
    ]
    final = (exp.result or {}).get("checkpoint")
    return CheckpointList(experiment_id=exp.id, items=items, final=final.rsplit("/", 1)[-1] if final else None)


@router.get(
    "/checkpoints/{name}",
    response_model=None,
    responses=RESPONSES | {200: {"content": {"application/octet-stream": {}}, "description": "The file"}},
)
def download_checkpoint(
    experiment_id: ExperimentId, name: FileName, ctx: CtxDep, session: SessionDep
) -> StreamingResponse:
    """Stream one checkpoint, with Content-Length and its SHA-256 (`X-Checksum-SHA256`, `Repr-Digest`)."""
    exp = store.get(session, experiment_id)
    location = runs.join(exp.run_dir, runs.CHECKPOINTS, name)
    missing = HTTPException(404, f"experiment {experiment_id} has no checkpoint {name!r}")
    if not name.endswith(".pt") or not runs.exists(location):
        raise missing
    try:  # keep_checkpoints rotation may delete it between the check and here
        size = runs.size(location)
        digest = ctx.sha_cache.get((location, size))
        if digest is None:  # files are written once; (path, size) guards against a file being rewritten
            digest = ctx.sha_cache.put((location, size), runfolder.sha256(location))
    except FileNotFoundError:
        raise missing from None
    headers = {
        "Content-Length": str(size),
        "X-Checksum-SHA256": digest,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(digest)).decode()}:",
        "ETag": f'"{digest}"',
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    return StreamingResponse(_chunks(location), media_type="application/octet-stream", headers=headers)


def _chunks(location: str) -> Iterator[bytes]:
    yield from runs.iter_chunks(location)


@router.get("/figures", response_model=FigureList, responses=RESPONSES)
def list_figures(experiment_id: ExperimentId, session: SessionDep) -> FigureList:
    exp = store.get(session, experiment_id)
    return FigureList(experiment_id=exp.id, items=runfolder.figures(exp.run_dir))


@router.get(
    "/figures/{name}",
    response_model=None,
    responses=RESPONSES | {200: {"content": {"image/png": {}}, "description": "The figure"}},
)
def get_figure(experiment_id: ExperimentId, name: FileName, session: SessionDep) -> StreamingResponse:
    """One PNG figure of the run folder (sample grid, mIoU curve, search heatmap...)."""
    exp = store.get(session, experiment_id)
    location = runs.join(exp.run_dir, runs.FIGURES, name)
    if not name.endswith(".png") or not runs.exists(location):
        raise HTTPException(404, f"experiment {experiment_id} has no figure {name!r}")
    try:
        headers = {"Content-Length": str(runs.size(location))}
    except FileNotFoundError:  # removed since the check
        raise HTTPException(404, f"experiment {experiment_id} has no figure {name!r}") from None
    return StreamingResponse(_chunks(location), media_type="image/png", headers=headers)
