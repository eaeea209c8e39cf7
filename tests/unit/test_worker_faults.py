"""The worker loop under injected faults, on SQLite and PostgreSQL, with FAKE engines.

The engines here do no inference (``FakeEngineForTests``); everything else is real: the
database, the blob storage, the queue, validation and finalization. Database outages are
injected by ``OutageSessions``, which refuses new sessions as a dead database would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from tests.helpers import create_validating_batch
from vllm_batch.batches.store.db_retry import Backoff, DbHealth, is_db_outage, retry_db
from vllm_batch.batches.store.rows import BatchRow, ChunkRow, FileRow, ResultRow
from vllm_batch.batches.store_context import StoreContext, open_store
from vllm_batch.batches.validate import ValidationSweeper, validate_batch
from vllm_batch.config import Settings
from vllm_batch.engines.engine import EngineResult
from vllm_batch.engines.manager import EngineManager
from vllm_batch.runtime import supervise as supervise_mod
from vllm_batch.worker import loop as loop_mod
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.loop import Worker


class FakeEngineForTests:
    """Answers every request with a canned completion after ``delay``; no inference.

    ``start`` fails while the model's name is in ``broken``.
    """

    def __init__(self, name: str, broken: set[str], delay: float = 0.002) -> None:
        self.model_name = name
        self._broken = broken
        self._delay = delay

    @property
    def max_in_flight(self) -> int:
        return 4

    async def start(self) -> None:
        if self.model_name in self._broken:
            raise OSError(f"config.json of {self.model_name} is not a valid JSON file")

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        await asyncio.sleep(self._delay)
        response = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": 0,
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        return EngineResult(200, orjson.dumps(response).decode(), input_tokens=3, output_tokens=1)


class _RefusedSession:
    async def __aenter__(self) -> Any:
        raise sa_exc.OperationalError(
            "SELECT 1", None, ConnectionRefusedError("connection refused (injected outage)")
        )

    async def __aexit__(self, *exc: object) -> None:
        return None


class OutageSessions:
    """The real sessionmaker, except that while ``down`` every new session is refused."""

    def __init__(self, real: Callable[[], Any]) -> None:
        self.real = real
        self.down = False
        self.refused = 0

    def __call__(self) -> Any:
        if self.down:
            self.refused += 1
            return _RefusedSession()
        return self.real()


@contextlib.asynccontextmanager
async def fake_store(
    database_url: str, tmp_path: Path, models: list[str], **overrides: Any
) -> AsyncIterator[StoreContext]:
    """A real store for fake-engine worker tests: chunks of 5 lines, fast polls and flushes."""
    settings = Settings(
        **{
            "database_url": database_url,
            "data_dir": tmp_path,
            "models": models,
            "chunk_size": 5,
            "poll_interval": 0.05,
            "flush_interval": 0.05,
            **overrides,
        }
    )
    async with open_store(settings) as ctx:
        yield ctx


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[StoreContext]:
    models = ["good=/nowhere/good", "bad=/nowhere/bad"]
    async with fake_store(database_url, tmp_path, models, lease_seconds=30) as ctx:
        yield ctx


async def make_batch(ctx: StoreContext, model: str, lines: int) -> str:
    """Store an input file and a ``validating`` batch for it, as the API would."""
    body = b"".join(
        json.dumps(
            {
                "custom_id": f"request-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": str(i)}]},
            }
        ).encode()
        + b"\n"
        for i in range(lines)
    )
    batch_id = await create_validating_batch(ctx, body, lines)
    return batch_id


async def batch_row(ctx: StoreContext, batch_id: str) -> BatchRow:
    async with ctx.sessions() as session:
        row = await session.get(BatchRow, batch_id)
        assert row is not None
        return row


async def done_chunks(ctx: StoreContext, batch_id: str) -> int:
    async with ctx.sessions() as session:
        chunks = await session.scalars(select(ChunkRow).where(ChunkRow.batch_id == batch_id))
        return sum(c.status == "done" for c in chunks)


async def wait_status(ctx: StoreContext, batch_id: str, status: str, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (await batch_row(ctx, batch_id)).status != status:
        assert asyncio.get_running_loop().time() < deadline, (await batch_row(ctx, batch_id)).status
        await asyncio.sleep(0.05)


def worker_for(
    store: StoreContext, broken: set[str], sessions: Any = None, first_retry: float = 0.2
) -> Worker:
    engines = EngineManager(
        store.settings.model_specs,
        lambda spec: FakeEngineForTests(spec.name, broken),
        first_retry=first_retry,
        max_retry=1.0,
    )
    shared = store.shared()
    if sessions is not None:
        shared["sessions"] = sessions
    worker = Worker(WorkerContext(**shared, engines=engines))
    worker.db_backoff = Backoff(first=0.05, max=0.5)
    return worker


async def test_worker_outlives_repeated_database_outages(store: StoreContext) -> None:
    lines = 200
    batch_id = await make_batch(store, "good", lines)
    await validate_batch(store, batch_id)
    sessions = OutageSessions(store.sessions)
    worker = worker_for(store, set(), sessions)
    shutdown = asyncio.Event()
    sessions.down = True  # the database is gone before the worker even starts
    task = asyncio.create_task(worker.run(shutdown))
    deadline = asyncio.get_running_loop().time() + 90
    while worker.db.ok:  # the worker's first claim meets the outage
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    # Outages come and go until the batch is completed, finalization included (the
    # finalizer takes its own lease again after an outage cut an attempt short).
    while (await batch_row(store, batch_id)).status != "completed":
        assert not task.done(), task
        assert asyncio.get_running_loop().time() < deadline, await done_chunks(store, batch_id)
        sessions.down = not sessions.down
        await asyncio.sleep(0.7 if sessions.down else 0.25)
    sessions.down = False
    assert not task.done(), "the loop must only end on shutdown"
    assert worker.db.outages >= 1 and sessions.refused > 0
    # A round still waiting out its backoff (the claim loop runs beside the chunk tasks)
    # sees the database back at its next retry.
    recovered_by = asyncio.get_running_loop().time() + 5
    while not worker.db.ok:
        assert asyncio.get_running_loop().time() < recovered_by, worker.db
        await asyncio.sleep(0.05)
    shutdown.set()
    await asyncio.wait_for(task, 10)
    row = await batch_row(store, batch_id)
    assert (row.total, row.completed, row.failed) == (lines, lines, 0)
    assert row.output_file_id is not None and row.error_file_id is None
    async with store.read_sessions() as session:
        output = await session.get(FileRow, row.output_file_id)
    assert output is not None
    with store.storage.open_read(output.storage_key) as handle:
        ids = [json.loads(line)["custom_id"] for line in handle.read().splitlines()]
    assert ids == [f"request-{i}" for i in range(lines)]


async def test_unexpected_error_in_a_round_is_logged_and_the_loop_goes_on(
    store: StoreContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_mod, "ERROR_PAUSE_SECONDS", 0.05)
    batch_id = await make_batch(store, "good", 20)
    await validate_batch(store, batch_id)
    worker = worker_for(store, set())
    real_claim = worker.claim
    calls = 0

    async def claim_with_a_bug() -> ChunkRow | None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("injected bug")
        return await real_claim()

    monkeypatch.setattr(worker, "claim", claim_with_a_bug)
    shutdown = asyncio.Event()
    task = asyncio.create_task(worker.run(shutdown))
    await wait_status(store, batch_id, "completed")
    assert worker.errors == 2 and not task.done()
    shutdown.set()
    await asyncio.wait_for(task, 10)
    row = await batch_row(store, batch_id)
    assert (row.completed, row.failed) == (20, 0)


async def test_model_that_cannot_load_is_not_claimed_and_fails_nothing(
    store: StoreContext,
) -> None:
    broken = {"bad"}
    bad_batch = await make_batch(store, "bad", 15)
    await validate_batch(store, bad_batch)
    worker = worker_for(store, broken, first_retry=0.3)
    shutdown = asyncio.Event()
    task = asyncio.create_task(worker.run(shutdown))
    # "good" loads at start; "bad" has never been tried, so one chunk is claimed, its
    # load fails, and the chunk goes back to the queue untouched.
    deadline = asyncio.get_running_loop().time() + 10
    while "bad" not in worker.ctx.engines.failures:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.0)  # several load retries (0.3 s doubling to 1 s)
    assert worker.ctx.engines.failures["bad"].attempts >= 2
    async with store.sessions() as session:
        chunks = (
            await session.scalars(select(ChunkRow).where(ChunkRow.batch_id == bad_batch))
        ).all()
        results = (
            await session.scalars(select(ResultRow).where(ResultRow.batch_id == bad_batch))
        ).all()
    assert results == [], "no line may become an error line because a model cannot load"
    assert all(c.status == "queued" for c in chunks), [(c.status, c.attempts) for c in chunks]
    assert sum(c.attempts for c in chunks) == 1, "claimed again while the model cannot load"
    row = await batch_row(store, bad_batch)
    assert (row.status, row.completed, row.failed) == ("in_progress", 0, 0)
    # Other models keep working meanwhile.
    good_batch = await make_batch(store, "good", 10)
    await validate_batch(store, good_batch)
    await wait_status(store, good_batch, "completed")
    # Repaired: the next load retry succeeds and the waiting batch completes.
    broken.clear()
    await wait_status(store, bad_batch, "completed")
    assert not worker.ctx.engines.failed
    row = await batch_row(store, bad_batch)
    assert (row.completed, row.failed) == (15, 0)
    shutdown.set()
    await asyncio.wait_for(task, 10)


async def test_validation_sweeper_retries_a_batch_stuck_by_a_storage_error(
    store: StoreContext,
) -> None:
    batch_id = await make_batch(store, "good", 7)
    async with store.sessions() as session:
        batch = await session.get(BatchRow, batch_id)
        assert batch is not None
        input_file = await session.get(FileRow, batch.input_file_id)
        assert input_file is not None
        key = input_file.storage_key
    with store.storage.open_read(key) as handle:
        content = handle.read()
    store.storage.delete(key)  # storage "outage": the blob cannot be read
    in_flight: set[str] = set()
    sweeper = ValidationSweeper(store, in_flight, stale_after=0.0)
    assert await sweeper.sweep() == 1
    assert (await batch_row(store, batch_id)).status == "validating"
    assert await sweeper.sweep() == 0, "retried before its backoff"
    with store.storage.open_write(key) as handle:
        handle.write(content)
    sweeper._retry_at[batch_id] = (0.0, 10.0)  # backoff passed
    assert await sweeper.sweep() == 1
    row = await batch_row(store, batch_id)
    assert (row.status, row.total) == ("in_progress", 7)
    assert await sweeper.sweep() == 0  # nothing left in validating


async def test_validation_sweeper_leaves_batches_validating_here_alone(
    store: StoreContext,
) -> None:
    batch_id = await make_batch(store, "good", 3)
    sweeper = ValidationSweeper(store, {batch_id}, stale_after=0.0)
    assert await sweeper.sweep() == 0
    assert (await batch_row(store, batch_id)).status == "validating"


# ------------------------------------------------------------------ pure logic


def test_outage_errors_are_retried_and_bugs_are_not() -> None:
    refused = sa_exc.OperationalError("SELECT 1", None, ConnectionRefusedError())
    assert is_db_outage(refused)
    assert is_db_outage(OSError("connection reset"))
    assert is_db_outage(TimeoutError())
    assert not is_db_outage(sa_exc.IntegrityError("INSERT", None, Exception("duplicate")))
    assert not is_db_outage(ValueError("bug"))


async def test_retry_db_waits_out_an_outage_and_records_it() -> None:
    health = DbHealth()
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise sa_exc.OperationalError("UPDATE", None, ConnectionRefusedError())
        return "done"

    backoff = Backoff(first=0.01, max=0.02)
    assert await retry_db(call, "test", health=health, backoff=backoff) == "done"
    assert calls == 4 and health.ok and health.outages == 1

    async def bug() -> None:
        raise sa_exc.IntegrityError("INSERT", None, Exception("duplicate"))

    with pytest.raises(sa_exc.IntegrityError):
        await retry_db(bug, "test", backoff=backoff)

    shutdown = asyncio.Event()

    async def down() -> None:
        shutdown.set()  # shutting down while the database is down: give up, raise
        raise OSError("connection refused")

    with pytest.raises(OSError):
        await retry_db(down, "test", shutdown=shutdown, backoff=backoff)


async def test_supervisor_restarts_a_dying_task_with_backoff() -> None:
    health = supervise_mod.TaskHealth("test task")
    shutdown = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"crash {runs}")
        if runs == 3:
            return  # ended early without shutdown: restarted too
        await shutdown.wait()

    task = asyncio.create_task(
        supervise_mod.supervise(health, flaky, shutdown, first_restart=0.01, max_restart=0.05)
    )
    while runs < 4:
        await asyncio.sleep(0.01)
    assert health.running and health.restarts == 3
    assert health.last_error == "returned before shutdown"
    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert not health.running and runs == 4
