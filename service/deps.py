"""Dependencies of the routes, declared once as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.context import AppContext


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


def get_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.readers() as session:
        yield session


def get_write_session(ctx: CtxDep) -> Iterator[Session]:
    with ctx.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
"""A read-only session (deferred transactions on SQLite)."""
WriteSessionDep = Annotated[Session, Depends(get_write_session)]
"""A session for routes that change rows (IMMEDIATE transactions on SQLite)."""
