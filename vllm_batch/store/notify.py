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
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger(__name__)
CHANNEL = "vllm_batch_work"


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

    async def start(self) -> None:
        if not self._url.startswith("postgresql"):
            return
        import asyncpg

        dsn = self._url.replace("postgresql+asyncpg://", "postgresql://", 1)
        try:
            self._conn = await asyncpg.connect(dsn)
            await self._conn.add_listener(CHANNEL, self._on_notify)
        except Exception:
            log.exception("LISTEN failed; workers will poll instead")
            self._conn = None

    def _on_notify(self, *_args: object) -> None:
        self._event.set()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> None:
        """Return when woken or after ``timeout`` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
