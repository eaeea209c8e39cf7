"""Keep a long-running task alive: restart it with backoff if it dies or returns early.

Used for the worker loop and the background services, so none of them can end silently.
``TaskHealth`` tells ``/ready`` whether the task runs and how often it was restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)
FIRST_RESTART_SECONDS = 1.0
MAX_RESTART_SECONDS = 30.0
STABLE_SECONDS = 60.0
"""A task that ran this long before dying restarts after the shortest pause again."""


@dataclass
class TaskHealth:
    """What a supervisor knows about its task."""

    name: str
    running: bool = False
    restarts: int = 0
    last_error: str | None = None
    last_failed_at: float | None = None


async def supervise(
    health: TaskHealth,
    run: Callable[[], Awaitable[None]],
    shutdown: asyncio.Event,
    *,
    first_restart: float = FIRST_RESTART_SECONDS,
    max_restart: float = MAX_RESTART_SECONDS,
) -> None:
    """Run ``run()`` until ``shutdown``; restart it (backing off) whenever it ends early."""
    delay = first_restart
    while not shutdown.is_set():
        started = time.monotonic()
        health.running = True
        try:
            await run()
            error: BaseException | None = None
        except Exception as exc:
            error = exc
        finally:
            health.running = False
        if error is None and shutdown.is_set():
            return
        if time.monotonic() - started >= STABLE_SECONDS:
            delay = first_restart
        health.restarts += 1
        health.last_failed_at = time.time()
        if error is None:
            health.last_error = "returned before shutdown"
            log.error("%s returned unexpectedly; restarting in %.1f s", health.name, delay)
        else:
            health.last_error = f"{error.__class__.__name__}: {error}"[:300]
            log.error("%s died; restarting in %.1f s", health.name, delay, exc_info=error)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdown.wait(), delay)
        delay = min(max_restart, delay * 2)
