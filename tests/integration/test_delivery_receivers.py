"""One dead webhook receiver does not delay the others: per-receiver limits and breakers
over the real outbox, with real HTTP receivers on loopback (no engine)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete

from tests.helpers import create_validating_batch, jsonl
from tests.webhook_receiver import silent_receiver, webhook_receiver
from vllm_batch.batches.states import BatchStatus
from vllm_batch.batches.store import outbox
from vllm_batch.batches.store.db import is_sqlite
from vllm_batch.batches.store.outbox import Limits
from vllm_batch.batches.store.rows import DeliveryRow
from vllm_batch.batches.store_context import StoreContext, open_store
from vllm_batch.config import Settings
from vllm_batch.deliveries.dispatcher import DeliveryDispatcher

pytestmark = pytest.mark.asyncio(loop_scope="function")
DEAD, ALIVE, OTHER = "127.0.0.3", "127.0.0.2", "127.0.0.4"


async def _finish(store: StoreContext, webhook_url: str, count: int = 1) -> list[str]:
    """``count`` batches reach ``completed`` with ``webhook_url``: their outbox rows land,
    as ``queries.finish_batch`` writes them. Returns the batch ids."""
    ids = [await create_validating_batch(store, jsonl([{}]), 1) for _ in range(count)]
    rows: list[DeliveryRow] = []
    for batch_id in ids:
        meta = {"webhook_url": webhook_url}
        rows += store.deliveries.rows(batch_id, meta, BatchStatus.COMPLETED, time.time())
    async with store.sessions() as session, session.begin():
        session.add_all(rows)
    return ids


@contextlib.asynccontextmanager
async def fresh_store(settings: Settings) -> AsyncIterator[StoreContext]:
    """The module's database (shared by its tests) with an empty outbox."""
    async with open_store(settings) as store:
        async with store.sessions() as session, session.begin():
            await session.execute(delete(DeliveryRow))
        yield store


@contextlib.asynccontextmanager
async def dispatching(store: StoreContext) -> AsyncIterator[DeliveryDispatcher]:
    shutdown = asyncio.Event()
    dispatcher = DeliveryDispatcher(store)
    task = asyncio.create_task(dispatcher.run(shutdown))
    try:
        yield dispatcher
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 60)  # a loaded machine's shutdown, not a hang


async def _wait(what: str, done: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.02)


def _settings(database_url: str, tmp_path: Path, **extra: Any) -> Settings:
    """On SQLite each test gets its own file. Once, under a full suite's load, one test's
    dispatcher waited out the busy timeout and the file stayed locked for the next two
    tests (cause not found; each test has its own event loop, which ends with it)."""
    if is_sqlite(database_url):
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'deliveries.db'}"
    return Settings(
        database_url=database_url,
        data_dir=tmp_path,
        webhook_allowed_hosts=[DEAD, ALIVE],
        **extra,
    )


async def test_claim_takes_at_most_each_receivers_room(database_url: str, tmp_path: Path) -> None:
    async with fresh_store(_settings(database_url, tmp_path)) as store:
        await _finish(store, f"http://{DEAD}:9/hook", 30)  # the oldest: first in line
        await _finish(store, f"http://{ALIVE}:9/a", 2)
        await _finish(store, f"http://{OTHER}:9/b", 1)

        async def claim(limits: Limits) -> list[str]:
            async with store.sessions() as session, session.begin():
                rows = await outbox.claim_due(
                    session, owner="t", now=time.time(), lease=60, limit=8, receivers=limits
                )
                claimed = [row.receiver for row in rows]
                await outbox.release(session, [row.id for row in rows], "t")
            return sorted(claimed)

        dead, alive, other = (f"webhook:{h}" for h in (DEAD, ALIVE, OTHER))
        assert await claim(Limits(frozenset(), {}, 2)) == [alive, alive, dead, dead, other]
        assert await claim(Limits(frozenset({dead}), {}, 2)) == [alive, alive, other]
        assert await claim(Limits(frozenset(), {dead: 1}, 3)) == [alive, alive, dead, other]


async def test_a_receiver_that_never_answers_does_not_delay_a_healthy_one(
    database_url: str, tmp_path: Path
) -> None:
    """The issue's case, with the default limits: 8 slots, a 10 s timeout, 1 s polls."""
    with silent_receiver(DEAD) as dead, webhook_receiver(ALIVE) as alive:
        settings = _settings(database_url, tmp_path, webhook_timeout=10)
        async with fresh_store(settings) as store, dispatching(store):
            await _finish(store, dead.url + "/hook", 40)
            hung = settings.delivery_host_concurrency  # the dead host's attempts hang
            await _wait("the dead host's connections", lambda: len(dead.accepted) >= hung)
            completed = time.time()
            await _finish(store, alive.script("/hook", 200))
            await _wait("the healthy receiver's event", lambda: alive.at("/hook"), 10)
            delay = alive.at("/hook")[0].at - completed
            assert delay < 5, f"the healthy event arrived {delay:.1f} s after its batch ended"
            assert dead.peak == settings.delivery_host_concurrency, dead.peak
    print(f"healthy event {delay:.2f} s after its batch completed; dead host peak {dead.peak}")


async def test_open_breaker_defers_without_spending_attempts(
    database_url: str, tmp_path: Path
) -> None:
    settings = _settings(
        database_url,
        tmp_path,
        webhook_timeout=0.5,
        delivery_poll_interval=0.05,
        delivery_host_concurrency=2,
        delivery_breaker_failures=2,
        delivery_breaker_cooldown=2,
        delivery_backoff_base=60,
    )
    with silent_receiver(DEAD) as dead:
        async with fresh_store(settings) as store:
            ids = await _finish(store, dead.url + "/hook", 10)
            async with dispatching(store) as dispatcher:
                await _wait("two attempts to time out", lambda: dispatcher.failed_attempts == 2)
                assert len(dead.accepted) == 2  # the breaker opened: nothing more was sent
                await _wait("the half-open probe", lambda: len(dead.accepted) == 3, 10)
                probe = dead.accepted[2]
                await _wait("the probe to fail", lambda: dispatcher.failed_attempts == 3, 5)
                await asyncio.sleep(1)  # open again: no further attempt in this second
                assert len(dead.accepted) == 3
            async with store.read_sessions() as session:
                rows = [row for b in ids for row in await outbox.for_batch(session, b)]
    # The breaker opened when the second attempt timed out (webhook_timeout after it was
    # accepted), so the probe came a cooldown after that at the earliest. (Timing the opening
    # from the test's poll instead raced a busy machine: the poll may see it late.)
    since_second = probe - dead.accepted[1]
    assert since_second >= settings.delivery_breaker_cooldown, since_second
    assert sorted(row.attempts for row in rows) == [0] * 7 + [1] * 3
    assert {row.status for row in rows} == {"pending"}
    waiting = [row for row in rows if row.attempts == 0]
    for row in waiting:  # deferred past the second cool-down; the retry horizon unchanged
        assert row.next_attempt_at is not None and row.next_attempt_at > probe + 1.5
        assert row.give_up_at == pytest.approx(row.created_at + settings.delivery_retry_horizon)


async def test_horizon_passing_while_the_breaker_is_open_fails_the_delivery(
    database_url: str, tmp_path: Path
) -> None:
    settings = _settings(
        database_url,
        tmp_path,
        webhook_timeout=0.3,
        delivery_poll_interval=0.05,
        delivery_breaker_failures=2,
        delivery_breaker_cooldown=60,
        delivery_retry_horizon=2.0,
    )
    with silent_receiver(DEAD) as dead:
        async with fresh_store(settings) as store:
            ids = await _finish(store, dead.url + "/hook", 5)

            async def settled() -> list[DeliveryRow]:
                async with store.read_sessions() as session:
                    return [row for b in ids for row in await outbox.for_batch(session, b)]

            async with dispatching(store):
                deadline = time.monotonic() + 10
                while any(row.status == "pending" for row in await settled()):
                    assert time.monotonic() < deadline, "deliveries still pending past horizon"
                    await asyncio.sleep(0.05)
            rows = await settled()
    assert len(dead.accepted) == 2  # the breaker opened; no attempt after it
    assert sorted(row.attempts for row in rows) == [0, 0, 0, 1, 1]
    assert {row.status for row in rows} == {"failed"}
    for row in rows:  # the attempted ones gave up as their next retry fell past the horizon
        if row.attempts == 0:
            assert row.finished_at is not None and row.finished_at >= row.give_up_at
            assert row.last_error == outbox.GAVE_UP_WHILE_OPEN
