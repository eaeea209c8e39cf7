"""Several dispatchers on one database never run the same delivery twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import create_validating_batch, jsonl
from tests.webhook_receiver import webhook_receiver
from vllm_batch.batches.states import BatchStatus
from vllm_batch.batches.store import outbox
from vllm_batch.batches.store_context import open_store
from vllm_batch.config import Settings
from vllm_batch.deliveries.dispatcher import DeliveryDispatcher

TARGETS = 24


async def test_three_dispatchers_deliver_each_event_once(database_url: str, tmp_path: Path) -> None:
    with webhook_receiver("127.0.0.2") as receiver:
        urls = [receiver.script(f"/t{i}", 200) for i in range(TARGETS)]
        for i in range(TARGETS):
            receiver.delay[f"/t{i}"] = 0.05
        settings = Settings(
            database_url=database_url,
            data_dir=tmp_path,
            webhook_urls=urls,
            webhook_allowed_hosts=["127.0.0.2"],
            delivery_poll_interval=0.02,
            delivery_concurrency=4,
        )
        async with contextlib.AsyncExitStack() as stack:
            stores = [await stack.enter_async_context(open_store(settings)) for _ in range(3)]
            batch_id = await create_validating_batch(stores[0], jsonl([{}]), 1)
            rows = stores[0].deliveries.rows(batch_id, None, BatchStatus.COMPLETED, time.time())
            assert len(rows) == TARGETS
            async with stores[0].sessions() as session, session.begin():
                session.add_all(rows)
            shutdown = asyncio.Event()
            dispatchers = [DeliveryDispatcher(store) for store in stores]
            tasks = [asyncio.create_task(d.run(shutdown)) for d in dispatchers]
            # Until every delivery is recorded as done (not only received: an attempt still
            # being recorded at shutdown is handed back, as a graceful stop must).
            deadline = time.monotonic() + 120
            while True:
                async with stores[0].read_sessions() as session:
                    rows_now = await outbox.for_batch(session, batch_id)
                if all(row.status == "succeeded" for row in rows_now):
                    break
                assert time.monotonic() < deadline, Counter(row.status for row in rows_now)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # any duplicate would arrive now
            shutdown.set()
            await asyncio.gather(*tasks)
            async with stores[0].read_sessions() as session:
                final = await outbox.for_batch(session, batch_id)
                owners = Counter()
                for row in final:
                    attempts = await outbox.attempts_of(session, row.id)
                    assert [a.number for a in attempts] == [1]
                    owners[attempts[0].owner] += 1
    assert Counter(r.path for r in receiver.requests) == {f"/t{i}": 1 for i in range(TARGETS)}
    assert {row.status for row in final} == {"succeeded"} and len(final) == TARGETS
    assert sum(d.delivered for d in dispatchers) == TARGETS
    assert len(owners) >= 2, owners  # the work really was shared


pytestmark = pytest.mark.asyncio(loop_scope="function")


async def test_graceful_stop_hands_webhook_attempts_back(database_url: str, tmp_path: Path) -> None:
    with webhook_receiver("127.0.0.2") as receiver:
        receiver.delay["/slow"] = 3
        settings = Settings(
            database_url=database_url,
            data_dir=tmp_path,
            webhook_urls=[receiver.script("/slow", 200)],
            webhook_allowed_hosts=["127.0.0.2"],
            delivery_poll_interval=0.02,
        )
        async with open_store(settings) as store:
            batch_id = await create_validating_batch(store, jsonl([{}]), 1)
            [row] = store.deliveries.rows(batch_id, None, BatchStatus.EXPIRED, time.time())
            async with store.sessions() as session, session.begin():
                session.add(row)
            shutdown = asyncio.Event()
            task = asyncio.create_task(DeliveryDispatcher(store).run(shutdown))
            while not receiver.at("/slow"):
                await asyncio.sleep(0.02)
            shutdown.set()
            await asyncio.wait_for(task, 2)  # does not wait for the slow receiver
            async with store.read_sessions() as session:
                [after] = await outbox.for_batch(session, batch_id)
    assert (after.status, after.attempts, after.lease_owner) == ("pending", 0, None)
