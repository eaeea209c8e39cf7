"""Ten graceful worker stops in the middle of the same chunk fail no line: a stop hands the
chunk back without charging an attempt (FAKE engine; the real database, queue, storage).

The e2e twin (``tests/e2e/test_faults.py``) restarts a real worker process on the real
engine; this one does the counting: ten stops against ``max_chunk_attempts=3``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.unit.test_worker_faults import (
    FakeEngineForTests,
    batch_row,
    fake_store,
    make_batch,
    wait_status,
)
from vllm_batch.batches.store.rows import ChunkRow
from vllm_batch.batches.validate import validate_batch
from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.manager import EngineManager
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.loop import Worker

STOPS = 10
LINES, CHUNK = 80, 40
PER_LIFE = 6
"""Requests each worker life may start: far fewer than a chunk, so every stop interrupts the
first chunk again (STOPS x PER_LIFE < LINES: the batch cannot end before the last stop)."""


class LimitedEngine(FakeEngineForTests):
    """Starts at most ``allowed`` requests; the others wait until they are cancelled."""

    def __init__(self, name: str, allowed: int | None) -> None:
        super().__init__(name, set())
        self.allowed = allowed
        self.started = 0

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        if self.allowed is not None and self.started >= self.allowed:
            await asyncio.Event().wait()  # held until the worker's stop cancels it
        self.started += 1
        return await super().run(url, body, request_id)


async def test_ten_graceful_stops_mid_chunk_fail_no_line(database_url: str, tmp_path: Path) -> None:
    overrides = {"chunk_size": CHUNK, "max_chunk_attempts": 3, "lease_seconds": 30}
    async with fake_store(database_url, tmp_path, ["good=/nowhere/good"], **overrides) as store:
        batch_id = await make_batch(store, "good", LINES)
        await validate_batch(store, batch_id)
        for life in range(STOPS + 1):
            engine = LimitedEngine("good", PER_LIFE if life < STOPS else None)
            engines = EngineManager(store.settings.model_specs, lambda spec, e=engine: e)
            worker = Worker(WorkerContext(**store.shared(), engines=engines))
            shutdown = asyncio.Event()
            task = asyncio.create_task(worker.run(shutdown))
            if life == STOPS:
                await wait_status(store, batch_id, "completed")
            else:
                deadline = asyncio.get_running_loop().time() + 30
                while engine.started < PER_LIFE:
                    assert not task.done(), task
                    assert asyncio.get_running_loop().time() < deadline, (
                        f"life {life}: {engine.started} requests started, waited for {PER_LIFE}"
                    )
                    await asyncio.sleep(0.01)
            shutdown.set()
            await asyncio.wait_for(task, 30)
            row = await batch_row(store, batch_id)
            assert row.failed == 0, (
                f"after stop {life + 1}: {row.completed} done, {row.failed} failed"
            )
            if life < STOPS:
                assert row.status == "in_progress", f"ended before stop {life + 1}: {row.status}"
        row = await batch_row(store, batch_id)
        assert (row.total, row.completed, row.failed) == (LINES, LINES, 0)
        assert row.error_file_id is None and row.output_file_id is not None
        async with store.read_sessions() as session:
            first = await session.scalar(
                select(ChunkRow).where(ChunkRow.batch_id == batch_id, ChunkRow.idx == 0)
            )
        assert first is not None
        # Claimed more often than max_chunk_attempts allows, and never charged for it.
        assert first.attempts > 3 and first.engine_failures == 0, (first.attempts, first.idx)
