"""Typed dependencies shared by every route."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.errors import APIError
from vllm_batch.api.state import AppContext


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


async def get_session(ctx: CtxDep) -> AsyncIterator[AsyncSession]:
    async with ctx.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def get_read_session(ctx: CtxDep) -> AsyncIterator[AsyncSession]:
    async with ctx.read_sessions() as session:
        yield session


ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session)]
"""For routes that only read: never blocks (or is blocked by) writers."""


def require_api_key(request: Request, ctx: CtxDep) -> None:
    """``Authorization: Bearer <key>`` when an API key is configured (constant-time compare)."""
    expected = ctx.settings.api_key
    if not expected:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise APIError(
            401,
            "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
