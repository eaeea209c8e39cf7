"""Typed dependencies shared by every route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.auth import Principal
from vllm_batch.api.errors import APIError
from vllm_batch.api.state import AppContext


def get_ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[AppContext, Depends(get_ctx)]


async def get_session(ctx: CtxDep) -> AsyncIterator[AsyncSession]:
    async with ctx.sessions() as session:
        yield session


# scope="function": the session closes (its connection back in the pool) when the route
# returns, not after the response is sent: a slow reader of a download holds no connection.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def get_read_session(ctx: CtxDep) -> AsyncIterator[AsyncSession]:
    async with ctx.read_sessions() as session:
        yield session


ReadSessionDep = Annotated[AsyncSession, Depends(get_read_session, scope="function")]
"""For routes that only read: never blocks (or is blocked by) writers. A route that holds
it must not open another session meanwhile (``ctx.sessions()``, ``lifecycle``): N such
requests at once would each hold one connection of the pool and wait for a second."""


def current_principal(request: Request) -> Principal:
    """The caller, resolved from the API key by the edge middleware before the body is read."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):  # the edge did not run: refuse, never guess
        raise APIError(
            401,
            "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
