"""Health, readiness, Prometheus metrics and the API docs.

/healthz is the only route without a token (liveness probes carry none); /docs and
/openapi.json need one like everything else (issue item 8).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import db
from service.deps import CtxDep
from service.schemas import Health, Readiness

public = APIRouter(tags=["system"])
router = APIRouter(tags=["system"])


@public.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the process answers (no token needed)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "Not ready"}})
async def readyz(ctx: CtxDep) -> JSONResponse:
    """Readiness: the database and the Ray dashboard answer; says which does not, and why."""
    database, ray = await asyncio.gather(asyncio.to_thread(db.ping, ctx.engine), asyncio.to_thread(ctx.ray.ping))
    body = Readiness(ready=database is None and ray is None, database=database, ray=ray, ray_address=ctx.ray.address)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_model=None, responses={200: {"content": {"text/plain": {}}, "description": "Metrics"}})
def metrics(ctx: CtxDep) -> Response:
    """Prometheus text: queue depth, running, finished by status, request latency."""
    return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")
