"""A worker holding several chunks when its engine breaks (SQLite and PostgreSQL; FAKE
engines, no inference: see ``tests/unit/test_worker_faults.py``).

* An engine failure hands every held chunk back, restarts the engine once, and the worker
  then runs one chunk at a time until one finishes cleanly: a request that kills the engine
  every time fails only its own chunk's lines, every other line is answered exactly once.
* A CUDA out-of-memory error halves the in-flight window once, after the other chunks have
  stopped, and loses no line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.unit.test_worker_faults import (
    FakeEngineForTests,
    batch_row,
    fake_store,
    make_batch,
    wait_status,
)
from vllm_batch.batches.store.rows import FileRow
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.batches.validate import validate_batch
from vllm_batch.engines.engine import EngineFailure, EngineOutOfMemory, EngineResult
from vllm_batch.engines.manager import EngineManager
from vllm_batch.worker import loop as loop_mod
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.loop import Worker

LINES = 60  # 12 chunks of 5
WINDOW = 12  # more than two chunks' lines: the worker holds several chunks at once


class TroubledEngineForTests(FakeEngineForTests):
    """``FakeEngineForTests`` that raises ``error`` on the request for line ``poison`` while
    ``budget[0]`` (shared by every engine the manager starts) is positive; counts starts."""

    starts = 0

    def __init__(
        self, name: str, poison: str, error: type[EngineFailure], budget: list[int]
    ) -> None:
        super().__init__(name, set(), delay=0.01)
        self.poison, self.error, self.budget = poison, error, budget

    @property
    def max_in_flight(self) -> int:
        return WINDOW

    async def start(self) -> None:
        TroubledEngineForTests.starts += 1

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        if body["messages"][0]["content"] == self.poison and self.budget[0] > 0:
            await asyncio.sleep(0.05)  # the other chunks' requests are in flight by now
            self.budget[0] -= 1
            raise self.error("injected: the engine died on this request")
        return await super().run(url, body, request_id)


@pytest.fixture
async def store(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StoreContext]:
    monkeypatch.setattr(loop_mod, "ENGINE_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(TroubledEngineForTests, "starts", 0)
    async with fake_store(
        database_url, tmp_path, ["m=/nowhere/m"], max_chunk_attempts=2, lease_seconds=30
    ) as ctx:
        yield ctx


async def run_until_final(
    store: StoreContext, engine: type[TroubledEngineForTests], timeout: float = 180, **kwargs: Any
) -> tuple[str, Worker, list[int]]:
    """Run one ``LINES``-line batch to a final status; also the number of chunks held, sampled."""
    engines = EngineManager(store.settings.model_specs, lambda spec: engine(spec.name, **kwargs))
    worker = Worker(WorkerContext(**store.shared(), engines=engines))
    batch = await make_batch(store, "m", LINES)
    await validate_batch(store, batch)
    shutdown = asyncio.Event()
    task = asyncio.create_task(worker.run(shutdown))
    held: list[int] = []

    async def sample() -> None:
        while True:
            held.append(len(worker.held))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await wait_status(store, batch, "completed", timeout=timeout)  # generous: loaded hosts
    finally:
        sampler.cancel()
        shutdown.set()
        await asyncio.wait_for(task, 30)
    return batch, worker, held


async def results(store: StoreContext, batch_id: str) -> dict[int, dict[str, Any]]:
    """The batch's output and error lines by input line, asserting one line per input line."""
    row = await batch_row(store, batch_id)
    lines: list[dict[str, Any]] = []
    async with store.sessions() as session:
        for file_id in (row.output_file_id, row.error_file_id):
            if file_id is not None:
                file = await session.get(FileRow, file_id)
                assert file is not None
                with store.storage.open_read(file.storage_key) as handle:
                    lines += [orjson.loads(line) for line in handle if line.strip()]
    by_line = {int(line["custom_id"].removeprefix("request-")): line for line in lines}
    assert len(lines) == LINES and set(by_line) == set(range(LINES))
    return by_line


async def test_a_request_that_kills_the_engine_fails_only_its_own_chunk(
    store: StoreContext, caplog: pytest.LogCaptureFixture
) -> None:
    # Line 33 is in chunk 6 (lines 30-34); it breaks the engine on every attempt.
    batch, worker, held = await run_until_final(
        store, TroubledEngineForTests, poison="33", error=EngineFailure, budget=[10**6]
    )
    assert max(held) >= 2, "the worker never held several chunks: nothing was tested"
    by_line = await results(store, batch)
    failed = sorted(line for line, data in by_line.items() if data.get("error"))
    assert 33 in failed and set(failed) <= {30, 31, 32, 33, 34}  # its chunk, nothing else
    assert "engine failed 2 times" in by_line[33]["error"]["message"]
    ok = [line for line, data in by_line.items() if not data.get("error")]
    assert len(ok) == LINES - len(failed)
    for line in ok:
        assert by_line[line]["response"]["status_code"] == 200
    row = await batch_row(store, batch)
    assert (row.completed, row.failed) == (LINES - len(failed), len(failed))
    # One restart per failure of the poisoned chunk (not one per held chunk), each before
    # the chunk ran again: no attempt ran on the broken engine.
    events = [
        r.getMessage().split(":")[0]
        for r in caplog.records
        if r.getMessage().startswith(("engine failed on chunk", "restarting the engine"))
    ]
    assert events == ["engine failed on chunk " + f"{batch}", "restarting the engine after"] * 2
    assert worker.chunks_done == LINES // 5  # the poisoned chunk ends done, with its errors


async def test_one_engine_failure_redoes_the_held_chunks_without_a_lost_line(
    store: StoreContext,
) -> None:
    batch, _, held = await run_until_final(
        store, TroubledEngineForTests, poison="17", error=EngineFailure, budget=[1]
    )
    assert max(held) >= 2
    by_line = await results(store, batch)
    assert not [line for line, data in by_line.items() if data.get("error")]
    assert TroubledEngineForTests.starts == 2  # restarted once
    row = await batch_row(store, batch)
    assert (row.completed, row.failed) == (LINES, 0)


async def test_out_of_memory_halves_the_window_once_and_loses_nothing(
    store: StoreContext,
) -> None:
    batch, worker, held = await run_until_final(
        store, TroubledEngineForTests, 60, poison="17", error=EngineOutOfMemory, budget=[1]
    )
    assert max(held) >= 2
    by_line = await results(store, batch)
    assert not [line for line, data in by_line.items() if data.get("error")]
    engines = worker.ctx.engines
    assert engines.limits["m"].max_in_flight == WINDOW // 2  # halved once, not per chunk
    assert TroubledEngineForTests.starts == 1  # a fake engine cannot resize: no restart
