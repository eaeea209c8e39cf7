"""Wake idle workers the moment work appears.

In one process (embedded server) the API sets an event directly. Across processes on
PostgreSQL, queue changes send ``NOTIFY vllm_batch_work`` (delivered on commit) and every
worker ``LISTEN``s on a dedicated connection. On SQLite across processes, workers fall
back to polling every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)
CHANNEL = "vllm_batch_work"
RECONNECT_SECONDS = 5.0


async def notify_work(session: AsyncSession) -> None:
    """Queue a wake-up for listening workers; sent when the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class WorkNotifier:
    """An event set by local wake-ups and, on PostgreSQL, by ``NOTIFY``."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._event = asyncio.Event()
        self._conn: Any = None
        self._last_attempt = 0.0
        self._forward: list[Callable[[], None]] = []

    def forward(self, wake: Callable[[], None]) -> None:
        """Also call ``wake`` on every local wake-up (a worker in a child process)."""
        self._forward.append(wake)

    async def start(self) -> None:
        if not self._url.startswith("postgresql"):
            return
        import asyncpg

        self._last_attempt = time.monotonic()
        dsn = self._url.replace("postgresql+asyncpg://", "postgresql://", 1)
        try:
            self._conn = await asyncio.wait_for(asyncpg.connect(dsn), RECONNECT_SECONDS)
            await self._conn.add_listener(CHANNEL, self._on_notify)
        except Exception as exc:
            log.warning("LISTEN failed (%s); polling until it reconnects", type(exc).__name__)
            self._conn = None

    async def _reconnect_if_lost(self) -> None:
        """After a database outage the LISTEN connection is gone: open it again."""
        if not self._url.startswith("postgresql"):
            return
        if self._conn is not None and not self._conn.is_closed():
            return
        if time.monotonic() - self._last_attempt < RECONNECT_SECONDS:
            return
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        await self.start()
        if self._conn is not None:
            log.info("LISTEN %s reconnected", CHANNEL)
            self._event.set()  # work may have appeared while we were not listening

    def _on_notify(self, *_args: object) -> None:
        self._event.set()

    def wake(self) -> None:
        self._event.set()
        for wake in self._forward:
            wake()

    async def wait(self, timeout: float) -> None:
        """Return when woken or after ``timeout`` seconds."""
        await self._reconnect_if_lost()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
