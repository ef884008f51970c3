"""`create_app`: the FastAPI control plane (`cdsp serve` runs it under uvicorn).

On start: migrate the database, start or adopt the embedded Ray head when no Ray address is
configured, and start the background loop (dispatcher + reconciler). On shutdown, the reverse.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from service import db, errors, ui
from service.auth import require_token
from service.context import AppContext
from service.control import ControlLoop
from service.observability import LatencyMiddleware, make_registry
from service.ray_head import EmbeddedHead
from service.ray_jobs import RayJobs
from service.routes import artifacts, experiments, system
from service.schemas import ErrorOut
from service.settings import Settings

log = logging.getLogger(__name__)
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "Missing or invalid bearer token"}
}


def _connect_ray(settings: Settings) -> tuple[RayJobs, EmbeddedHead | None]:
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        if os.environ.get(var):  # the Ray SDK lets these override the address we pass it
            log.warning("%s is set in the environment; the Ray SDK prefers it to CDSP_RAY_ADDRESS", var)
    if settings.ray_address:
        token = settings.ray_token or os.environ.get("RAY_AUTH_TOKEN")
        return RayJobs(settings.ray_address, token, settings.ray_timeout, settings.dashboard_url), None
    head = EmbeddedHead(settings.data_dir.resolve(), settings.ray_num_cpus)
    info = head.start()
    assert info.dashboard_url is not None  # the embedded head always runs its dashboard
    return RayJobs(info.dashboard_url, info.token, settings.ray_timeout, settings.dashboard_url), head


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.getLogger("httpx").setLevel(logging.WARNING)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: AppContext = app.state.ctx
        db.migrate(ctx.engine)
        ctx.ray_jobs, ctx.head = _connect_ray(settings)
        # Where to look, on the console uvicorn prints to: the web page, and the embedded head's dashboard
        # with how to get past its token prompt.
        console = logging.getLogger("uvicorn.error")
        console.info("web page: /ui/ on this server (sign in with an API token)")
        if ctx.head is not None and ctx.head.info is not None:
            console.info(
                "Ray dashboard: %s (token auth: paste the cluster's token, the 'token' field of %s)",
                ctx.head.info.dashboard_url, ctx.head.state_file,
            )  # fmt: skip
        if settings.background:
            ctx.loop = ControlLoop(settings, ctx.sessions, ctx.ray, ctx.head)
            ctx.loop.start()
        # Everything imported and set up so far lives as long as the process: move it out of the
        # collector's reach, or each full collection walks ~100k objects (~50 ms under the GIL),
        # which showed up as the API's p99 latency under load.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if ctx.loop is not None:
                ctx.loop.stop()
            if ctx.ray_jobs is not None:
                ctx.ray_jobs.close()
            if ctx.head is not None:
                ctx.head.stop()
            ctx.engine.dispose()

    app = FastAPI(
        title="CDSP training service",
        version="0.1.0",
        summary="Submit, follow and fetch scribble-supervised segmentation experiments (CDSP) run on Ray.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by routes.system behind the token
    )
    engine = db.make_engine(settings.db_url)
    sessions, readers = db.make_sessions(engine), db.make_readers(engine)
    ctx = AppContext(settings, engine, sessions, readers, tokens=settings.resolved_tokens())
    ctx.registry, latency = make_registry(readers, ctx.ray_up)
    app.state.ctx = ctx
    app.add_middleware(errors.BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(LatencyMiddleware, histogram=latency)  # added last: outermost, so 413s are timed too
    errors.install(app, pages=("/ui/", ui.error_page))
    app.include_router(system.public)
    app.include_router(ui.router)  # the web page: its own auth (header or sign-in cookie), see service.ui
    for router in (system.router, experiments.router, artifacts.router):
        app.include_router(router, dependencies=[Depends(require_token)], responses=UNAUTHORIZED)
    build_openapi = app.openapi  # FastAPI's, which caches its result in app.openapi_schema

    def openapi_with_links() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = experiments.add_links(build_openapi())
        return app.openapi_schema

    app.openapi = openapi_with_links  # type: ignore[method-assign]
    return app
