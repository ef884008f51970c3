"""Error answers: 404 unknown id, 409 illegal action, 413 body too large, 422 bad input with field paths,
503 Ray down.

Every 422 has FastAPI's shape (`detail: [{loc, msg, type}]`, what /openapi.json declares) plus
`field`, the dotted spec key (`stage2.epochs`) that `--set` and YAML files use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cdsp_core.spec import located
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


HtmlPage = Callable[[int, str], Response]
"""An error as a web page: (status, message) -> the response."""


def install(app: FastAPI, pages: tuple[str, HtmlPage] | None = None) -> None:
    """The error answers below as JSON; under the path prefix of `pages`, as its HTML page instead."""

    def answer(request: Request, status: int, content: dict[str, Any]) -> Response:
        if pages is not None and request.url.path.startswith(pages[0]):
            detail = content["detail"]
            if isinstance(detail, list):
                detail = "; ".join(f"{e.get('field') or 'request'}: {e.get('msg')}" for e in detail)
            return pages[1](status, str(detail))
        return JSONResponse(status_code=status, content=jsonable_encoder(content))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = []
        for err in exc.errors():
            entry = {k: err[k] for k in ("loc", "msg", "type") if k in err}
            entry["msg"] = str(entry.get("msg", "")).removeprefix("Value error, ")
            entry["field"] = field_path(err.get("loc", ()))
            if entry["field"] == "spec":  # a rule across fields: filed under the key it names
                field, msg = located({"loc": (), "msg": err.get("msg", "")})
                entry.update(field=field or "spec", msg=msg)
            errors.append(entry)
        return answer(request, 422, {"detail": errors})

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> Response:
        errors = [{"loc": loc, "msg": msg, "type": kind, "field": field_path(loc)} for loc, msg, kind in exc.errors]
        return answer(request, 422, {"detail": errors})

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return answer(request, 404, {"detail": str(exc)})

    @app.exception_handler(IllegalTransition)
    async def _conflict(request: Request, exc: IllegalTransition) -> Response:
        return answer(request, 409, {"detail": str(exc), "status": exc.status})

    @app.exception_handler(RayUnavailable)
    async def _ray_down(request: Request, exc: RayUnavailable) -> Response:
        return answer(request, 503, {"detail": f"Ray is unavailable: {exc}"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if pages is not None and request.url.path.startswith(pages[0]):
            page = pages[1](exc.status_code, str(exc.detail))
            page.headers.update(exc.headers or {})  # e.g. a 405's Allow
            return page
        return await http_exception_handler(request, exc)


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
