"""Error answers: 404 unknown id, 409 illegal action, 422 bad input with field paths, 503 Ray down.

Every 422 has FastAPI's shape (`detail: [{loc, msg, type}]`, what /openapi.json declares) plus
`field`, the dotted spec key (`stage2.epochs`) that `--set` and YAML files use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.ray_jobs import RayUnavailable
from service.states import IllegalTransition
from service.store import NotFound


class InputError(Exception):
    """Bad input found after parsing (dataset layout, idempotency key reuse): a 422."""

    def __init__(self, errors: Sequence[tuple[list[str], str, str]]):
        self.errors = errors
        super().__init__("; ".join(msg for _, msg, _ in errors))


def field_path(loc: Sequence[Any]) -> str:
    """`("body", "spec", "stage2", "epochs")` -> `stage2.epochs`; other locations keep their tail."""
    parts = [str(p) for p in loc]
    if parts[:2] == ["body", "spec"]:
        parts = parts[2:] or ["spec"]
    elif parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def _422(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            entry = {k: err[k] for k in ("loc", "msg", "type") if k in err}
            entry["field"] = field_path(err.get("loc", ()))
            errors.append(entry)
        return _422(errors)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return _422([{"loc": loc, "msg": msg, "type": kind, "field": field_path(loc)} for loc, msg, kind in exc.errors])

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(IllegalTransition)
    async def _conflict(request: Request, exc: IllegalTransition) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc), "status": exc.status})

    @app.exception_handler(RayUnavailable)
    async def _ray_down(request: Request, exc: RayUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"Ray is unavailable: {exc}"})
