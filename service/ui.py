"""The web page: the experiments as a researcher looks at them (`/ui/`), one experiment with its curves,
figures, log and actions (`/ui/experiments/{id}`), and several compared (`/ui/compare`).

Server-rendered HTML (Jinja2, autoescaped) with inline SVG charts (`service.charts`): no JavaScript
library, nothing fetched from elsewhere, so it works offline. Pages of active experiments reload
themselves every few seconds.

Auth: the API's bearer tokens, taken from the `Authorization` header (scripts) or from a cookie that
the sign-in form sets (HttpOnly, SameSite=Strict, Path=/ui, Secure over HTTPS). Without one a page
answers 401 with the sign-in form and shows no experiment data. Actions (cancel, retry, sign-out) are
POST forms carrying a CSRF token derived from the session's token (HMAC), checked on every POST.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import yaml
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.status import HTTP_303_SEE_OTHER

from cdsp_core import runs
from cdsp_core.spec import flatten
from service import charts, runfolder, store, views
from service.auth import token_matches
from service.deps import CtxDep, SessionDep, WriteSessionDep
from service.models import utcnow
from service.routes import artifacts, experiments
from service.routes.experiments import ExperimentId
from service.states import ACTIVE, Status

router = APIRouter(prefix="/ui", include_in_schema=False)
COOKIE = "cdsp_token"
REFRESH_S = 5
LOG_LINES = 80
LIST_PAGE = 100  # experiments per page of the list
SORT_LIMIT = 5000  # the newest matches the mIoU sort reads
TERMS = ("segs", "segc", "ds", "dc", "lorm")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its log prefixes for terminals
templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


# ---- auth ----------------------------------------------------------------------------------


def _token(request: Request) -> str | None:
    """The caller's valid token, from the Authorization header or the sign-in cookie; else None."""
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE)
    if given and token_matches(given, request.app.state.ctx.tokens):
        return given
    return None


def csrf_token(token: str) -> str:
    return hmac.new(hashlib.sha256(token.encode()).digest(), b"cdsp-ui-csrf", hashlib.sha256).hexdigest()


def _render(template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    response = HTMLResponse(templates.get_template(template).render(**values), status_code=status_code)
    # No page of this service may be framed by another site, nor cached by a shared cache.
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'unsafe-inline'; img-src 'self'"
    response.headers["Cache-Control"] = "no-store"
    return response


def _sign_in(error: str | None = None, next_url: str = "/ui/") -> HTMLResponse:
    page = _render("signin.html", 401, error=error, next=next_url)
    page.headers["WWW-Authenticate"] = "Bearer"
    return page


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the only kind these forms send), last value of each field."""
    body = (await request.body()).decode(errors="replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def error_page(status: int, message: str) -> HTMLResponse:
    """An error under /ui/ as a page (not the API's JSON), with the way back to the list."""
    return _render("error.html", status_code=status, status=status, message=message)


def _safe_next(value: str | None) -> str:
    """Only a path of this page may follow a sign-in (no open redirect)."""
    return value if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value else "/ui/"


@router.get("/login")
def sign_in_form(next: str = "/ui/") -> HTMLResponse:
    return _render("signin.html", error=None, next=_safe_next(next))


@router.post("/login")
async def sign_in(request: Request) -> Response:
    form = await _form(request)
    token = form.get("token", "")
    if not token or not token_matches(token, request.app.state.ctx.tokens):
        return _sign_in("that token is not one of the service's API tokens", _safe_next(form.get("next")))
    response = RedirectResponse(_safe_next(form.get("next")), status_code=HTTP_303_SEE_OTHER)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/ui"
    )
    return response


@router.post("/logout")
async def sign_out(request: Request) -> Response:
    token = _token(request)
    if token is None:
        return _sign_in()
    if not hmac.compare_digest((await _form(request)).get("csrf", ""), csrf_token(token)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    response = RedirectResponse("/ui/login", status_code=HTTP_303_SEE_OTHER)
    response.delete_cookie(COOKIE, path="/ui")
    return response


# ---- pages ---------------------------------------------------------------------------------


def _duration(exp: Any) -> str:
    if exp.started_at is None:
        return ""
    start, end = exp.started_at, exp.finished_at or utcnow()
    if (start.tzinfo is None) != (end.tzinfo is None):  # SQLite hands back naive UTC times
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    seconds = max(0, int((end - start).total_seconds()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _pseudo_miou(exp: Any) -> float | None:
    value = (exp.result or {}).get("pseudo_label_miou")
    if value is None:
        value = (exp.latest_metrics or {}).get("pseudo_label_miou")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _here(request: Request) -> str:
    """This page's path and query, where signing in leads back to (the ids of a comparison, filters)."""
    return f"{request.url.path}?{request.url.query}" if request.url.query else request.url.path


@router.get("/")
def experiment_list(
    request: Request,
    session: SessionDep,
    status: Annotated[list[Status] | None, Query()] = None,
    kind: Annotated[str | None, Query(max_length=16)] = None,
    name: Annotated[str | None, Query(max_length=100)] = None,
    sort: Annotated[str, Query(pattern="^(created|miou)$")] = "created",
    live: bool = True,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    token = _token(request)
    if token is None:
        return _sign_in(next_url=_here(request))
    # `name`: a part of the name, any case (the API's filter is exact). The mIoU lives in JSON: that
    # sort reads the newest SORT_LIMIT matches and pages them here.
    start = (page - 1) * LIST_PAGE
    if sort == "miou":
        items, total = store.search(session, status or (), kind or None, limit=SORT_LIMIT, name_contains=name)
    else:
        items, total = store.search(session, status or (), kind or None, limit=LIST_PAGE, offset=start,
                                    name_contains=name)  # fmt: skip
    summaries = {e.id: views.summary(e) for e in items}
    if sort == "miou":
        items.sort(key=lambda e: -(m if (m := summaries[e.id].miou) is not None else -math.inf))
        items, total = items[start : start + LIST_PAGE], min(total, SORT_LIMIT)  # pages of what was read
    rows = [{"exp": e, "summary": summaries[e.id], "pseudo": _pseudo_miou(e), "duration": _duration(e)} for e in items]
    active = any(e.status in ACTIVE or e.status == Status.queued for e in items)

    # A reload clears ticked boxes and typed filters: `live=0` pauses it while the user picks.
    def link(**params: Any) -> str:
        url = str(request.url.include_query_params(**params))
        return url[url.index("/ui/") :]

    last = max(1, math.ceil(total / LIST_PAGE))
    pages = {"previous": link(page=min(page - 1, last)) if page > 1 else None,
             "next": link(page=page + 1) if page < last else None}  # fmt: skip
    return _render(
        "list.html", rows=rows, total=total, statuses=[s.value for s in Status], chosen=[s.value for s in status or ()],
        kind=kind or "", name=name or "", sort=sort, refresh=REFRESH_S if active and live else None,
        active=active, live=live, toggle=link(live="0" if live else "1"), first=start + 1, pages=pages,
        csrf=csrf_token(token),
    )  # fmt: skip


def _curves(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metric rows as chart series: per stage, loss terms, mIoU and lr against the epoch."""
    out: dict[str, Any] = {}
    for stage in ("stage1", "stage2"):
        epochs = {r["epoch"]: r for r in rows if r.get("stage") == stage and isinstance(r.get("epoch"), int)}
        if not epochs:
            continue
        ordered = [epochs[e] for e in sorted(epochs)]

        def series(key: str, ordered: list[dict[str, Any]] = ordered) -> list[tuple[float, float]]:
            return [(float(r["epoch"]), float(r[key])) for r in ordered if isinstance(r.get(key), int | float)]

        losses = {"loss": series("loss"), **{t: series(f"loss_{t}") for t in TERMS if series(f"loss_{t}")}}
        scores = {k: series(k) for k in ("miou", "cls_map", "cls_f1") if series(k)}
        out[stage] = {
            "loss": charts.line_chart(f"{stage}: loss terms", losses),
            "score": charts.line_chart(f"{stage}: validation", scores) if scores else None,
            "lr": charts.line_chart(f"{stage}: learning rate", {"lr": series("lr")}),
        }
    return out


def _per_class(exp: Any, rows: list[dict[str, Any]]) -> Any:
    values = None
    for r in rows:
        if isinstance(r.get("per_class_iou"), list):
            values = r["per_class_iou"]
    values = (exp.result or {}).get("per_class_iou", values)
    if not values:
        return None
    names = (exp.spec.get("data") or {}).get("class_names") or [f"class {i}" for i in range(len(values))]
    labels = [str(n) for n in names][: len(values)] + [f"class {i}" for i in range(len(names), len(values))]
    return charts.bar_chart("validation IoU per class (%)", labels, [None if v is None else float(v) for v in values])


def _search(exp: Any) -> dict[str, Any] | None:
    if exp.kind != "search":
        return None
    trials = exp.trials or []
    mode = (exp.spec.get("search") or {}).get("mode", "max")
    best = views.best_trial(trials, exp.result, mode)
    cells: dict[tuple[float, float], float] = {}
    for t in trials:
        p, miou = t.get("params") or {}, t.get("miou")
        ls, lc = p.get("stage2.lambda_s"), p.get("stage2.lambda_c")
        if isinstance(ls, int | float) and isinstance(lc, int | float) and isinstance(miou, int | float):
            cell, better = (float(ls), float(lc)), (min if mode == "min" else max)
            cells[cell] = better(float(miou), cells[cell]) if cell in cells else float(miou)
    xs, ys = sorted({k[0] for k in cells}), sorted({k[1] for k in cells})
    ratios = {}
    for key in ("data.shrink_ratio", "data.drop_ratio"):
        pts = sorted(
            (float(t["params"][key]), float(t["miou"]))
            for t in trials
            if isinstance((t.get("params") or {}).get(key), int | float) and isinstance(t.get("miou"), int | float)
        )
        if pts:
            ratios[key] = charts.line_chart(f"mIoU against {key}", {"mIoU": pts}, x_label=key)
    return {
        "trials": trials,
        "best": best.get("trial") if best else None,
        "heatmap": charts.heatmap("mIoU over lambda_s x lambda_c", xs, ys, cells, "lambda_s", "lambda_c", mode)
        if cells
        else None,
        "ratios": ratios,
    }


@router.get("/experiments/{experiment_id}")
def experiment_page(experiment_id: ExperimentId, request: Request, ctx: CtxDep, session: SessionDep) -> HTMLResponse:
    token = _token(request)
    if token is None:
        return _sign_in(next_url=_here(request))
    exp = store.get(session, experiment_id)
    # A search's trials log their own epochs: the page's curves are the search's rows, its trials table
    # and heatmap the trials'.
    rows = [r.data for r in store.metric_rows(session, experiment_id) if not r.data.get("trial")]
    log = ""
    with contextlib.suppress(Exception):  # the page shows without its log when Ray does not answer
        log = ANSI.sub("", artifacts._tail(_page_log(ctx, exp), LOG_LINES))
    sid = exp.submission_id
    final = (exp.result or {}).get("checkpoint")
    return _render(
        "experiment.html", exp=exp, summary=views.summary(exp), transitions=store.transitions(session, exp.id),
        curves=_curves(rows), per_class=_per_class(exp, rows), search=_search(exp),
        figures=runfolder.figures(exp.run_dir), checkpoints=runfolder.checkpoints(exp.run_dir),
        final=final.rsplit("/", 1)[-1] if final else None, log=log,
        spec=yaml.safe_dump(exp.spec, sort_keys=False), ray_url=ctx.ray.job_url(sid) if sid else None,
        pseudo=_pseudo_miou(exp), duration=_duration(exp), csrf=csrf_token(token),
        can_cancel=exp.status == Status.queued or exp.status in ACTIVE,
        can_retry=exp.status in (Status.failed, Status.cancelled),
        refresh=REFRESH_S if exp.status == Status.queued or exp.status in ACTIVE else None,
    )  # fmt: skip


def _page_log(ctx: Any, exp: Any) -> str:
    """The log the page shows: the run folder's copy, which the control loop refreshes every
    `log_mirror_interval` seconds while the job runs, else Ray's (a page reloading every few seconds
    in several tabs must not fetch a long job's whole log from Ray each time)."""
    sid = exp.submission_id
    mirrored = runfolder.log_location(exp.run_dir, sid) if sid else None
    if mirrored is not None and runs.exists(mirrored):
        return runs.read_text(mirrored)
    return artifacts._read_logs(ctx, exp)


async def _action(experiment_id: str, request: Request) -> str | None:
    """The caller's token after checking its CSRF token (403 otherwise); None: not signed in."""
    token = _token(request)
    if token is None:
        return None
    if not hmac.compare_digest((await _form(request)).get("csrf", ""), csrf_token(token)):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return token


@router.post("/experiments/{experiment_id}/cancel")
async def cancel(experiment_id: ExperimentId, request: Request, ctx: CtxDep, session: WriteSessionDep) -> Response:
    if await _action(experiment_id, request) is None:
        return _sign_in()
    experiments.cancel_experiment(experiment_id, ctx, session, Response())
    return RedirectResponse(f"/ui/experiments/{quote(experiment_id)}", status_code=HTTP_303_SEE_OTHER)


@router.post("/experiments/{experiment_id}/retry")
async def retry(experiment_id: ExperimentId, request: Request, ctx: CtxDep, session: WriteSessionDep) -> Response:
    if await _action(experiment_id, request) is None:
        return _sign_in()
    experiments.retry_experiment(experiment_id, ctx, session)
    return RedirectResponse(f"/ui/experiments/{quote(experiment_id)}", status_code=HTTP_303_SEE_OTHER)


@router.get("/experiments/{experiment_id}/figures/{name}")
def figure(experiment_id: ExperimentId, name: artifacts.FileName, request: Request, session: SessionDep) -> Response:
    if _token(request) is None:
        return _sign_in()
    return artifacts.get_figure(experiment_id, name, session)


@router.get("/experiments/{experiment_id}/checkpoints/{name}")
def checkpoint(
    experiment_id: ExperimentId, name: artifacts.FileName, request: Request, ctx: CtxDep, session: SessionDep
) -> Response:
    if _token(request) is None:
        return _sign_in()
    download: StreamingResponse = artifacts.download_checkpoint(experiment_id, name, ctx, session)
    download.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return download


@router.get("/compare")
def compare(
    request: Request, session: SessionDep, id: Annotated[list[ExperimentId] | None, Query(max_length=12)] = None
) -> HTMLResponse:
    token = _token(request)
    if token is None:
        return _sign_in(next_url=_here(request))
    exps = [store.get(session, i) for i in dict.fromkeys(id or [])]
    miou: dict[str, list[tuple[float, float]]] = {}
    loss: dict[str, list[tuple[float, float]]] = {}
    for e in exps:
        rows = [r.data for r in store.metric_rows(session, e.id, "stage2") if not r.data.get("trial")]
        label = f"{e.name} ({e.id[-6:]})"
        miou[label] = [(float(r["epoch"]), float(r["miou"])) for r in rows if isinstance(r.get("miou"), int | float)]
        loss[label] = [(float(r["epoch"]), float(r["loss"])) for r in rows if isinstance(r.get("loss"), int | float)]
    flat = [flatten(e.spec) for e in exps]
    keys = sorted({k for f in flat for k in f})
    differ = [(k, [f.get(k, "-") for f in flat]) for k in keys if len({repr(f.get(k, "-")) for f in flat}) > 1]
    return _render(
        "compare.html", exps=exps, summaries=[views.summary(e) for e in exps], differ=differ,
        miou=charts.line_chart("stage 2: validation mIoU", miou) if exps else None,
        loss=charts.line_chart("stage 2: loss", loss) if exps else None, csrf=csrf_token(token),
    )  # fmt: skip
