"""Error answers: 404 unknown id, 409 illegal action, 413 body too large, 422 bad input with field paths,
503 Ray down.

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


class BodyLimit:
    """Pure ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it, by
    its Content-Length, or, for a body without one (chunked), once the bytes read pass the limit (such
    a body is read here, at most `limit` bytes, and handed on whole)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = JSONResponse(status_code=413, content={"detail": f"request body larger than {self.limit} bytes"})
        await body({"type": "http"}, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}
