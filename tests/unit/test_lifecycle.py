"""The batch/chunk state machine on SQLite and PostgreSQL, without an engine (seconds).

Every legal transition, every illegal one, claims under contention, idempotent and
lease-checked saves, and racing finalizers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select, update

from tests.helpers import create_validating_batch
from vllm_batch.batches import lifecycle
from vllm_batch.batches.finalize import finalize_batch
from vllm_batch.batches.states import (
    BATCH_MOVES,
    TERMINAL,
    BatchStatus,
    ChunkStatus,
    IllegalTransition,
    StopReason,
    batch_sources,
)
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow, ChunkRow, ResultRow
from vllm_batch.batches.store_context import StoreContext, open_store
from vllm_batch.config import Settings
from vllm_batch.observability import metrics
from vllm_batch.pipeline.input import BatchPlan
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.protocol.ids import now

LINES = 10
CHUNK = 4


@contextlib.asynccontextmanager
async def store(database_url: str, data_dir: Path) -> AsyncIterator[StoreContext]:
    settings = Settings(database_url=database_url, data_dir=data_dir, lease_seconds=30)
    async with open_store(settings) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture
async def ctx(database_url: str, data_dir: Path) -> AsyncIterator[StoreContext]:
    async with store(database_url, data_dir) as context:
        yield context


def input_lines(n: int = LINES) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]},
            }
        )
        + b"\n"
        for i in range(n)
    )


async def new_batch(ctx: StoreContext, *, queued: bool = True) -> str:
    """A batch of ``LINES`` lines in chunks of ``CHUNK``; queued unless told otherwise."""
    batch_id = await create_validating_batch(ctx, input_lines(), LINES)
    assert (await batch(ctx, batch_id)).status == BatchStatus.VALIDATING
    if queued:
        assert (
            await lifecycle.queue_or_fail(ctx, batch_id, plan(batch_id)) == BatchStatus.IN_PROGRESS
        )
    return batch_id


def plan(model: str = "m") -> BatchPlan:
    """The batch's plan; tests use the batch id as its model, so claims find only it."""
    offsets = [0]
    for line in input_lines().splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    chunks = [
        (start, min(start + CHUNK, LINES), offsets[start]) for start in range(0, LINES, CHUNK)
    ]
    return BatchPlan(model=model, total=LINES, chunks=chunks)


def result(line: int, error: bool = False) -> LineResult:
    data = orjson.dumps({"custom_id": f"r{line}", "line": line}).decode()
    return LineResult(line=line, is_error=error, data=data, input_tokens=1)


async def batch(ctx: StoreContext, batch_id: str) -> BatchRow:
    async with ctx.read_sessions() as session:
        row = await queries.get_batch(session, batch_id)
    assert row is not None
    return row


async def force(ctx: StoreContext, batch_id: str, **values: Any) -> None:
    """Test setup only: put a batch in an arbitrary state."""
    async with ctx.sessions() as session, session.begin():
        await session.execute(update(BatchRow).where(BatchRow.id == batch_id).values(**values))


async def run_all_chunks(ctx: StoreContext, batch_id: str) -> None:
    """Claim every chunk of ``batch_id``, save all its lines and finish it."""
    owner = ctx.instance_id
    while chunk := await lifecycle.claim_chunk(ctx, owner, [batch_id]):
        results = [result(i) for i in range(chunk.start_line, chunk.end_line)]
        outcome = await lifecycle.save(ctx, chunk, owner, results)
        assert len(outcome.new) == len(results)
        assert await lifecycle.finish_chunk(ctx, chunk, owner) == ChunkStatus.DONE


# ------------------------------------------------------------------ the table


def test_transition_table_is_closed() -> None:
    assert set(BATCH_MOVES) == set(BatchStatus)
    assert {s for s in BatchStatus if not BATCH_MOVES[s]} == TERMINAL
    assert batch_sources(BatchStatus.COMPLETED) == {BatchStatus.FINALIZING}
    assert batch_sources(BatchStatus.IN_PROGRESS) == {BatchStatus.VALIDATING}


def test_state_tables_are_the_wire_statuses() -> None:
    """Batch, upload and delivery statuses are the wire models' own enums (and the rows'),
    and every table names every status of its machine."""
    from vllm_batch.batches.states import (
        CHUNK_MOVES,
        DELIVERY_MOVES,
        UPLOAD_MOVES,
        DeliveryStatus,
        UploadStatus,
    )
    from vllm_batch.batches.store.rows import BatchRow, DeliveryRow, UploadRow
    from vllm_batch.protocol.batch import Batch
    from vllm_batch.protocol.delivery import Delivery
    from vllm_batch.protocol.upload import Upload

    for wire, row, enum in (
        (Batch, BatchRow, BatchStatus),
        (Upload, UploadRow, UploadStatus),
        (Delivery, DeliveryRow, DeliveryStatus),
    ):
        assert wire.model_fields["status"].annotation is enum
        assert row.__table__.c.status.type.enum_class is enum
    for moves, states in (
        (BATCH_MOVES, BatchStatus),
        (CHUNK_MOVES, ChunkStatus),
        (UPLOAD_MOVES, UploadStatus),
        (DELIVERY_MOVES, DeliveryStatus),
    ):
        assert set(moves) == set(states)
        assert all(target in states for targets in moves.values() for target in targets)


# ------------------------------------------------------------------ batches


async def test_happy_path_completes(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    assert (await batch(ctx, batch_id)).status == BatchStatus.IN_PROGRESS
    await run_all_chunks(ctx, batch_id)
    assert await finalize_batch(ctx, batch_id)
    row = await batch(ctx, batch_id)
    assert row.status == BatchStatus.COMPLETED
    assert (row.completed, row.failed, row.total) == (LINES, 0, LINES)
    assert row.finalizing_at is not None and row.completed_at is not None
    assert row.finalize_owner is None
    await assert_output_consistent(ctx, row)


async def assert_output_consistent(ctx: StoreContext, row: BatchRow) -> None:
    async with ctx.read_sessions() as session:
        output = await queries.get_file(session, row.output_file_id or "")
        left = await session.scalar(
            select(func.count()).select_from(ResultRow).where(ResultRow.batch_id == row.id)
        )
    assert output is not None
    assert left == 0, "saved results must be deleted once the output is committed"
    assert ctx.storage.size(output.storage_key) == output.bytes
    with ctx.storage.open_read(output.storage_key) as handle:
        lines = [orjson.loads(line) for line in handle.read().splitlines()]
    assert [line["line"] for line in lines] == list(range(row.total))


async def test_validation_failure_is_terminal(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx, queued=False)
    bad = BatchPlan()
    bad.error("invalid_json_line", "bad", 1)
    assert await lifecycle.queue_or_fail(ctx, batch_id, bad) == BatchStatus.FAILED
    row = await batch(ctx, batch_id)
    assert row.status == BatchStatus.FAILED and row.errors
    # failed is terminal: nothing moves it again
    with pytest.raises(IllegalTransition):
        await lifecycle.queue_or_fail(ctx, batch_id, plan())
    with pytest.raises(IllegalTransition):
        await lifecycle.cancel(ctx, batch_id)
    assert (await batch(ctx, batch_id)).status == BatchStatus.FAILED


async def test_queue_twice_is_refused(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    with pytest.raises(IllegalTransition):
        await lifecycle.queue_or_fail(ctx, batch_id, plan())
    async with ctx.read_sessions() as session:
        chunks = await session.scalar(
            select(func.count()).select_from(ChunkRow).where(ChunkRow.batch_id == batch_id)
        )
    assert chunks == len(plan().chunks)


async def test_cancel_paths(ctx: StoreContext) -> None:
    validating = await new_batch(ctx, queued=False)
    row = await lifecycle.cancel(ctx, validating)
    assert row.status == BatchStatus.CANCELLING
    # a cancelled-while-validating batch is never queued
    with pytest.raises(IllegalTransition):
        await lifecycle.queue_or_fail(ctx, validating, plan())
    again = await lifecycle.cancel(ctx, validating)  # idempotent
    assert again.status == BatchStatus.CANCELLING
    assert await finalize_batch(ctx, validating)
    assert (await batch(ctx, validating)).status == BatchStatus.CANCELLED
    with pytest.raises(lifecycle.NoSuchBatch):
        await lifecycle.cancel(ctx, "batch_missing")

    running = await new_batch(ctx)
    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [running])
    assert chunk is not None and chunk.batch_id == running
    await lifecycle.cancel(ctx, running)
    # the live lease blocks finalization; the worker's next save sees the stop request
    assert not await finalize_batch(ctx, running)
    outcome = await lifecycle.save(ctx, chunk, owner, [result(chunk.start_line)])
    assert outcome.stop_reason == StopReason.CANCEL
    await lifecycle.release_chunk(ctx, chunk, owner)
    assert await finalize_batch(ctx, running)
    row = await batch(ctx, running)
    assert row.status == BatchStatus.CANCELLED and row.completed == 1
    # no chunk of a stopped batch is claimable
    assert await lifecycle.claim_chunk(ctx, owner, [running]) is None


async def test_expire_marks_unfinished_lines(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None
    await lifecycle.save(ctx, chunk, owner, [result(0), result(1)])
    await lifecycle.release_chunk(ctx, chunk, owner)
    await force(ctx, batch_id, expires_at=now() - 1)
    assert batch_id in await lifecycle.expire_overdue(ctx)
    assert batch_id not in await lifecycle.expire_overdue(ctx)  # once
    assert await finalize_batch(ctx, batch_id)
    row = await batch(ctx, batch_id)
    assert row.status == BatchStatus.EXPIRED
    assert (row.completed, row.failed) == (2, LINES - 2)


ILLEGAL_TARGETS = [
    (source, target)
    for source in BatchStatus
    for target in (
        BatchStatus.IN_PROGRESS,
        BatchStatus.FAILED,
        BatchStatus.CANCELLING,
        BatchStatus.COMPLETED,
    )
    if target not in BATCH_MOVES[source]
    and not (target is BatchStatus.CANCELLING and source is BatchStatus.CANCELLING)
]


@pytest.mark.parametrize(("source", "target"), ILLEGAL_TARGETS)
async def test_illegal_batch_transitions_change_nothing(
    ctx: StoreContext, source: BatchStatus, target: BatchStatus
) -> None:
    batch_id = await new_batch(ctx)
    await force(ctx, batch_id, status=source)
    before = await batch(ctx, batch_id)
    if target is BatchStatus.IN_PROGRESS:
        with pytest.raises(IllegalTransition):
            await lifecycle.queue_or_fail(ctx, batch_id, plan(batch_id))
    elif target is BatchStatus.FAILED:
        bad = BatchPlan()
        bad.error("x", "y")
        with pytest.raises(IllegalTransition):
            await lifecycle.queue_or_fail(ctx, batch_id, bad)
    elif target is BatchStatus.CANCELLING:
        if source is BatchStatus.CANCELLED:
            assert (await lifecycle.cancel(ctx, batch_id)).status == source  # idempotent no-op
        else:
            with pytest.raises(IllegalTransition):
                await lifecycle.cancel(ctx, batch_id)
    else:
        await force(ctx, batch_id, finalize_owner=ctx.instance_id)
        with pytest.raises(IllegalTransition):
            await lifecycle.finish(
                ctx, before, files=[], output_file_id=None, error_file_id=None, extra_failed=0
            )
    after = await batch(ctx, batch_id)
    assert after.status == source
    assert (after.completed, after.failed, after.output_file_id) == (
        before.completed,
        before.failed,
        before.output_file_id,
    )


# ------------------------------------------------------------------ chunks and saves


async def test_claims_under_contention_are_exclusive(ctx: StoreContext) -> None:
    ids = [await new_batch(ctx) for _ in range(3)]
    expected = 3 * len(plan().chunks)
    owners = [f"host/ns/{i}/t" for i in range(8)]

    async def claim_all(owner: str) -> list[str]:
        got = []
        while chunk := await lifecycle.claim_chunk(ctx, owner, ids):
            got.append(chunk.id)
            await asyncio.sleep(0)
        return got

    claimed = await asyncio.gather(*(claim_all(o) for o in owners))
    flat = [chunk_id for got in claimed for chunk_id in got]
    assert len(flat) == len(set(flat)) == expected


async def test_save_is_idempotent(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None and chunk.batch_id == batch_id
    first = await lifecycle.save(ctx, chunk, owner, [result(0), result(1, error=True)])
    again = await lifecycle.save(ctx, chunk, owner, [result(0), result(1, error=True), result(2)])
    assert (first.saved, again.saved) == (2, 1)
    row = await batch(ctx, batch_id)
    assert (row.completed, row.failed, row.input_tokens) == (2, 1, 3)


async def test_a_line_twice_in_one_save_counts_once(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None
    saved = await lifecycle.save(ctx, chunk, owner, [result(0), result(1), result(0)])
    assert saved.saved == 2
    row = await batch(ctx, batch_id)
    assert (row.completed, row.failed, row.input_tokens) == (2, 0, 2)


async def test_result_text_pages_keep_input_order(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None
    errors = {1, 2, 6}
    lines = [result(i, error=i in errors) for i in range(LINES)]
    await lifecycle.save(ctx, chunk, owner, lines[5:] + lines[:5])  # saved out of order
    async with ctx.read_sessions() as session:
        pages = [p async for p in queries.stream_result_text(session, batch_id, page_size=3)]
    assert len(pages) == -(-LINES // 3)
    joined = {
        flag: "\n".join(page[flag] for page in pages if flag in page) for flag in (False, True)
    }
    for flag in (False, True):
        assert joined[flag] == "\n".join(r.data for r in lines if r.is_error is flag)


async def test_a_claim_tells_whether_it_took_over_an_expired_lease(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)

    async def claim(owner: str) -> queries.Claim | None:
        async with ctx.sessions() as session, session.begin():
            return await queries.claim_chunk(
                session, owner=owner, models=[batch_id], now=time.time(), lease=30
            )

    first = await claim("a")
    assert first is not None and not first.lease_expired
    async with ctx.sessions() as session, session.begin():
        await session.execute(
            update(ChunkRow)
            .where(ChunkRow.id == first.chunk.id)
            .values(lease_until=time.time() - 1)
        )
    taken = await claim("b")
    assert taken is not None and taken.lease_expired and taken.chunk.id == first.chunk.id
    assert taken.chunk.lease_owner == "b" and taken.chunk.attempts == 2
    await lifecycle.release_chunk(ctx, taken.chunk, "b")
    again = await claim("c")
    assert again is not None and not again.lease_expired and again.chunk.id == first.chunk.id


async def test_save_after_losing_the_lease_writes_nothing(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    chunk = await lifecycle.claim_chunk(ctx, "old/ns/1/a", [batch_id])
    assert chunk is not None and chunk.batch_id == batch_id
    async with ctx.sessions() as session, session.begin():
        await session.execute(
            update(ChunkRow).where(ChunkRow.id == chunk.id).values(lease_until=time.time() - 1)
        )
    taken = await lifecycle.claim_chunk(ctx, "new/ns/2/b", [batch_id])
    assert taken is not None and taken.id == chunk.id and taken.attempts == 2
    with pytest.raises(IllegalTransition):
        await lifecycle.save(ctx, chunk, "old/ns/1/a", [result(0)])
    with pytest.raises(IllegalTransition):
        await lifecycle.finish_chunk(ctx, chunk, "old/ns/1/a")
    with pytest.raises(IllegalTransition):
        await lifecycle.release_chunk(ctx, chunk, "old/ns/1/a")
    row = await batch(ctx, batch_id)
    assert row.completed == 0
    assert await queries_done(ctx, batch_id) == set()


async def queries_done(ctx: StoreContext, batch_id: str) -> set[int]:
    async with ctx.read_sessions() as session:
        return await queries.done_lines(session, batch_id, 0, LINES)


async def test_save_into_finished_batch_is_refused(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    await run_all_chunks(ctx, batch_id)
    assert await finalize_batch(ctx, batch_id)
    # a stale worker still believing it holds a chunk of this batch
    async with ctx.sessions() as session, session.begin():
        await session.execute(
            update(ChunkRow)
            .where(ChunkRow.batch_id == batch_id, ChunkRow.idx == 0)
            .values(status=ChunkStatus.RUNNING, lease_owner=owner, lease_until=time.time() + 60)
        )
        chunk = await session.get(ChunkRow, f"{batch_id}:0")
    assert chunk is not None
    with pytest.raises(IllegalTransition):
        await lifecycle.save(ctx, chunk, owner, [result(0)])
    row = await batch(ctx, batch_id)
    assert (row.status, row.completed) == (BatchStatus.COMPLETED, LINES)


async def test_only_engine_failures_count(ctx: StoreContext) -> None:
    batch_id = await new_batch(ctx)
    owner = ctx.instance_id
    for _ in range(3):  # graceful releases: not failures
        chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
        assert chunk is not None and chunk.batch_id == batch_id
        await lifecycle.release_chunk(ctx, chunk, owner)
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None
    assert (chunk.attempts, chunk.engine_failures) == (4, 0)
    await lifecycle.release_chunk(ctx, chunk, owner, engine_failure=True)
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None and chunk.engine_failures == 1
    await lifecycle.release_chunk(ctx, chunk, owner)


# ------------------------------------------------------------------ the timeline


async def test_timeline_keeps_the_first_start_and_the_last_save(ctx: StoreContext) -> None:
    """``first_line_started_at`` keeps the earliest stamp (a later or resumed chunk never
    moves it); ``last_line_finished_at`` follows saves of new lines, never backwards."""
    batch_id = await new_batch(ctx)
    row = await batch(ctx, batch_id)
    assert row.first_line_started_at is None and row.last_line_finished_at is None
    t0 = time.time()
    await lifecycle.first_line_started(ctx, batch_id, t0 + 5)
    await lifecycle.first_line_started(ctx, batch_id, t0 + 9)  # a later or resumed chunk
    assert (await batch(ctx, batch_id)).first_line_started_at == t0 + 5
    await lifecycle.first_line_started(ctx, batch_id, t0 + 2)  # earlier, committed later
    assert (await batch(ctx, batch_id)).first_line_started_at == t0 + 2

    owner = ctx.instance_id
    chunk = await lifecycle.claim_chunk(ctx, owner, [batch_id])
    assert chunk is not None
    before = time.time()
    await lifecycle.save(ctx, chunk, owner, [result(chunk.start_line)])
    saved = (await batch(ctx, batch_id)).last_line_finished_at
    assert saved is not None and before <= saved <= time.time()
    await lifecycle.save(ctx, chunk, owner, [result(chunk.start_line)])  # not a new line
    await lifecycle.save(ctx, chunk, owner, [])  # a heartbeat
    assert (await batch(ctx, batch_id)).last_line_finished_at == saved
    # a save from a worker whose clock is behind does not move it back
    await force(ctx, batch_id, last_line_finished_at=saved + 100)
    await lifecycle.save(ctx, chunk, owner, [result(chunk.start_line + 1)])
    assert (await batch(ctx, batch_id)).last_line_finished_at == saved + 100


async def test_phases_are_observed_once_per_completed_batch(
    database_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Racing finalizers: only the one whose final transition committed records the batch's
    phases; a cancelled batch records none."""
    observed: list[tuple[str | None, dict[str, float]]] = []
    monkeypatch.setattr(
        metrics, "batch_phases", lambda model, phases: observed.append((model, dict(phases)))
    )
    async with store(database_url, data_dir) as a, store(database_url, data_dir) as b:
        batch_id = await new_batch(a)
        await lifecycle.first_line_started(a, batch_id, time.time())
        await run_all_chunks(a, batch_id)
        wins = await asyncio.gather(finalize_batch(a, batch_id), finalize_batch(b, batch_id))
        finalized = time.time()
        assert sorted(wins) == [False, True]
        row = await batch(a, batch_id)
        assert len(observed) == 1, observed
        model, phases = observed[0]
        assert model == row.model and list(phases) == ["validation", "queue", "run", "finalize"]
        assert all(seconds >= 0 for seconds in phases.values())
        assert row.first_line_started_at is not None and row.last_line_finished_at is not None
        assert phases["run"] == pytest.approx(row.last_line_finished_at - row.first_line_started_at)
        assert row.completed_at is not None
        # Measured by the finalizer's clock after its commit (not the whole-second
        # completed_at): within the time the two finalizers took.
        assert phases["finalize"] <= finalized - row.last_line_finished_at

        cancelled = await new_batch(a)
        await lifecycle.cancel(a, cancelled)
        assert await finalize_batch(a, cancelled)
        assert len(observed) == 1


# ------------------------------------------------------------------ finalization races


async def test_racing_finalizers_write_exactly_one_output(
    database_url: str, data_dir: Path
) -> None:
    async with (
        store(database_url, data_dir) as a,
        store(database_url, data_dir) as b,
        store(database_url, data_dir) as c,
    ):
        batch_id = await new_batch(a)
        await run_all_chunks(a, batch_id)
        wins = await asyncio.gather(*(finalize_batch(x, batch_id) for x in (a, b, c)))
        assert sorted(wins) == [False, False, True]
        row = await batch(a, batch_id)
        assert row.status == BatchStatus.COMPLETED
        await assert_output_consistent(a, row)
        blobs = list((data_dir / "batches" / batch_id).rglob("*.jsonl"))
        assert len(blobs) == 1, blobs


async def test_finalizer_that_lost_its_lease_commits_nothing(
    database_url: str, data_dir: Path
) -> None:
    async with store(database_url, data_dir) as a, store(database_url, data_dir) as b:
        batch_id = await new_batch(a)
        await run_all_chunks(a, batch_id)
        claimed = await lifecycle.claim_finalization(a, batch_id, lease=60)
        assert claimed.status == BatchStatus.FINALIZING
        # b cannot take a live lease...
        assert not await finalize_batch(b, batch_id)
        # ...but takes it over once it lapsed (a stalled), and finishes the batch.
        await force(a, batch_id, finalize_lease_until=time.time() - 1)
        assert await finalize_batch(b, batch_id)
        with pytest.raises(IllegalTransition):
            await lifecycle.finish(
                a, claimed, files=[], output_file_id=None, error_file_id=None, extra_failed=0
            )
        with pytest.raises(IllegalTransition):
            await lifecycle.renew_finalization(a, batch_id, 60)
        row = await batch(a, batch_id)
        assert row.status == BatchStatus.COMPLETED and row.finalize_owner is None
        await assert_output_consistent(a, row)
