"""LISTEN/NOTIFY wake-ups survive a terminated connection (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database
from vllm_batch.batches.store import notify


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


async def test_listen_reconnects_after_its_backend_is_terminated(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notify, "RECONNECT_SECONDS", 0.2)
    notifier = notify.WorkNotifier(pg_url)
    await notifier.start()
    name = pg_url.rsplit("/", 1)[1]
    dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.close()
        await asyncio.sleep(0.3)
        await notifier.wait(0.1)  # notices the lost connection and listens again
        await notifier.wait(0.01)  # consumes the wake-up sent on reconnecting
        sender = await asyncpg.connect(dsn)
        started = time.monotonic()
        waiter = asyncio.create_task(notifier.wait(10))
        await asyncio.sleep(0.1)
        await sender.execute(f"SELECT pg_notify('{notify.CHANNEL}', '')")
        await asyncio.wait_for(waiter, 5)
        await sender.close()
        assert time.monotonic() - started < 3, "a NOTIFY must wake the waiter, not the timeout"
    finally:
        await notifier.close()
