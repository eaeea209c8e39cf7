"""Retry a database call through an outage: exponential backoff with full jitter.

Only errors a database outage causes are retried (lost or refused connections, a locked
SQLite file, timeouts); a bug (an integrity or SQL error) is raised at once. Retries go on
until the call succeeds or ``shutdown`` is set, so a worker waits out an outage of any
length instead of ending. ``DbHealth`` remembers an ongoing outage for ``/ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_random_exponential,
)

from vllm_batch.batches.store.db import is_transient
from vllm_batch.observability import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_db_outage(exc: BaseException) -> bool:
    """Whether ``exc`` looks like the database being unreachable (worth retrying)."""
    return is_transient(exc)


@dataclass
class DbHealth:
    """The state of the database as a worker last saw it."""

    failing_since: float | None = None
    last_error: str | None = None
    outages: int = 0

    @property
    def ok(self) -> bool:
        return self.failing_since is None

    def failed(self, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = time.time()
            self.outages += 1
        self.last_error = f"{exc.__class__.__name__}: {exc}"[:300]

    def recovered(self) -> None:
        if self.failing_since is not None:
            log.info("database reachable again after %.0f s", time.time() - self.failing_since)
        self.failing_since = None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a random wait in ``[0, min(max, first*2**n)]``."""

    first: float = 0.5
    max: float = 15.0


async def retry_db(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    shutdown: asyncio.Event | None = None,
    health: DbHealth | None = None,
    backoff: Backoff = Backoff(),
) -> T:
    """Run ``call()`` until it succeeds, retrying database outages (see module docstring).

    Raises the last error if ``shutdown`` is set while the database is still down.
    """

    def stop(state: RetryCallState) -> bool:
        return shutdown is not None and shutdown.is_set()

    def before_sleep(state: RetryCallState) -> None:
        assert state.outcome is not None
        error = state.outcome.exception()
        assert error is not None
        if health is not None:
            health.failed(error)
        metrics.db_retry()
        log.warning(
            "database unavailable (%s: %s) while trying to %s; retry %d in %.1f s",
            error.__class__.__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
            what,
            state.attempt_number,
            state.upcoming_sleep,
        )

    async def sleep(seconds: float) -> None:
        if shutdown is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdown.wait(), seconds)

    retrying = AsyncRetrying(
        retry=retry_if_exception(is_db_outage),
        wait=wait_random_exponential(multiplier=backoff.first, max=backoff.max),
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:
        return await call()

    result: T = await retrying(attempt)
    if health is not None:
        health.recovered()
    return result
