"""A worker serving two models switches to the other one once its work has waited
``model_max_wait`` with nothing running, instead of starving it while the loaded model
always has work (SQLite and PostgreSQL; FAKE engines, no inference: see
``tests/unit/test_worker_faults.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_worker_faults import (
    FakeEngineForTests,
    batch_row,
    fake_store,
    make_batch,
    wait_status,
)
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.batches.validate import validate_batch
from vllm_batch.engines.manager import EngineManager
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.loop import Worker


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[StoreContext]:
    models = ["first=/nowhere/first", "second=/nowhere/second"]
    async with fake_store(database_url, tmp_path, models, model_max_wait=1.0) as ctx:
        yield ctx


async def test_starved_model_gets_the_worker_within_the_max_wait(store: StoreContext) -> None:
    engines = EngineManager(
        store.settings.model_specs, lambda spec: FakeEngineForTests(spec.name, set(), delay=0.02)
    )
    worker = Worker(WorkerContext(**store.shared(), engines=engines))
    busy = await make_batch(store, "first", 3000)  # far more than a few seconds of work
    await validate_batch(store, busy)
    shutdown = asyncio.Event()
    task = asyncio.create_task(worker.run(shutdown))
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while (await batch_row(store, busy)).completed < 20:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        waiting = await make_batch(store, "second", 12)
        await validate_batch(store, waiting)
        await wait_status(store, waiting, "completed", timeout=60)
        row = await batch_row(store, busy)
        assert row.status == "in_progress" and row.completed < 3000, "it waited for all of it"
        assert (await batch_row(store, waiting)).completed == 12
        # ...and the first model gets the worker back for the rest of its work.
        deadline = asyncio.get_running_loop().time() + 30
        start = row.completed
        while (await batch_row(store, busy)).completed <= start:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 30)
