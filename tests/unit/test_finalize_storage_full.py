"""A batch whose output does not fit, without an engine, on SQLite and PostgreSQL: the data
directory is a real 2 MiB tmpfs (the database lives elsewhere). The attempt fails with the
reason on the batch and no folder left, waits for its backoff, and completes once space
is freed, with every line once and the reason cleared. Also the sweep of attempts left by
a process that died mid-finalization."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import update

from tests.helpers import create_validating_batch
from tests.tmpfs import fill, small_tmpfs
from vllm_batch.batches import lifecycle
from vllm_batch.batches.attempt_sweep import sweep_stale_attempts
from vllm_batch.batches.finalize import finalize_batch, retry_delay
from vllm_batch.batches.states import BatchStatus, ChunkStatus
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow
from vllm_batch.batches.store_context import StoreContext, open_store
from vllm_batch.config import Settings
from vllm_batch.pipeline.input import BatchPlan
from vllm_batch.pipeline.line_result import LineResult

LINES = 12
CHUNK = 4
PAD = 40_000  # bytes per output line: the output (~480 KB) cannot fit in what is left


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "2m") as mount:
        yield mount


@contextlib.asynccontextmanager
async def store(
    database_url: str, data_dir: Path, **overrides: object
) -> AsyncIterator[StoreContext]:
    settings = Settings(database_url=database_url, data_dir=data_dir, **overrides)  # type: ignore[arg-type]
    async with open_store(settings) as ctx:
        yield ctx


def input_lines() -> bytes:
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
        for i in range(LINES)
    )


async def done_batch(ctx: StoreContext) -> str:
    """A batch whose every line is saved (big outputs), ready to finalize."""
    body = input_lines()
    batch_id = await create_validating_batch(ctx, body, LINES)
    offsets = [0]
    for line in body.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    chunks = [(s, min(s + CHUNK, LINES), offsets[s]) for s in range(0, LINES, CHUNK)]
    assert (
        await lifecycle.queue_or_fail(
            ctx, batch_id, BatchPlan(model=batch_id, total=LINES, chunks=chunks)
        )
        == BatchStatus.IN_PROGRESS
    )
    owner = ctx.instance_id
    while chunk := await lifecycle.claim_chunk(ctx, owner, [batch_id]):
        results = [
            LineResult(
                line=i,
                is_error=False,
                data=orjson.dumps({"custom_id": f"r{i}", "pad": "x" * PAD}).decode(),
                input_tokens=1,
            )
            for i in range(chunk.start_line, chunk.end_line)
        ]
        assert len((await lifecycle.save(ctx, chunk, owner, results)).new) == len(results)
        assert await lifecycle.finish_chunk(ctx, chunk, owner) == ChunkStatus.DONE
    return batch_id


async def get(ctx: StoreContext, batch_id: str) -> BatchRow:
    async with ctx.read_sessions() as session:
        row = await queries.get_batch(session, batch_id)
    assert row is not None
    return row


def folders(root: Path) -> list[str]:
    """Everything under ``root/batches``, relative to it."""
    top = root / "batches"
    return sorted(p.relative_to(top).as_posix() for p in top.rglob("*"))


async def test_output_that_does_not_fit_waits_and_completes(
    database_url: str, disk: Path, tmp_path: Path
) -> None:
    data = disk / "data"
    async with store(database_url, data, finalize_retry_max_seconds=0.2) as ctx:
        batch_id = await done_batch(ctx)
        filler = fill(disk, leave=128 * 1024)

        assert not await finalize_batch(ctx, batch_id)
        row = await get(ctx, batch_id)
        assert row.status == BatchStatus.FINALIZING and row.output_file_id is None
        assert row.errors is not None and len(row.errors) == 1
        error = row.errors[0]
        assert error["code"] == "storage_full" and error["line"] is None
        assert error["message"].startswith(f"The file storage (local directory {data}) is full")
        assert "(attempt 1)" in error["message"]
        assert folders(data) == []  # no attempt folder, no batch folder
        attempts, retry_at = ctx.finalize_backoff[batch_id]
        assert attempts == 1 and row.finalize_owner == ctx.instance_id
        assert row.finalize_lease_until == pytest.approx(retry_at)
        assert ctx.storage.health.refusals >= 1

        # The next try waits for its backoff; a second refusal doubles nothing past the cap.
        assert not await finalize_batch(ctx, batch_id)
        assert ctx.finalize_backoff[batch_id][0] == 1  # too early: not even tried
        while time.time() < ctx.finalize_backoff[batch_id][1]:
            await asyncio.sleep(0.05)
        assert not await finalize_batch(ctx, batch_id)
        assert ctx.finalize_backoff[batch_id][0] == 2
        assert "(attempt 2)" in (await get(ctx, batch_id)).errors[0]["message"]  # type: ignore[index]
        assert folders(data) == []

        filler.unlink()
        while time.time() < ctx.finalize_backoff[batch_id][1]:
            await asyncio.sleep(0.05)
        assert await finalize_batch(ctx, batch_id)
        row = await get(ctx, batch_id)
        assert row.status == BatchStatus.COMPLETED and row.errors is None
        assert row.completed == LINES and batch_id not in ctx.finalize_backoff
        async with ctx.read_sessions() as session:
            out = await queries.get_file(session, row.output_file_id or "")
        assert out is not None
        with ctx.storage.open_read(out.storage_key) as handle:
            ids = [orjson.loads(line)["custom_id"] for line in handle.read().splitlines()]
        assert ids == [f"r{i}" for i in range(LINES)]
        attempt = Path(out.storage_key).parent.name
        where = f"{batch_id}/{attempt}"
        assert folders(data) == [batch_id, where, f"{where}/output.jsonl"]


def test_retry_delay_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 60) for n in range(1, 8)] == [2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(10_000, 60) == 60
    assert retry_delay(1, 0.5) == 0.5


async def test_sweep_removes_stale_attempts_only(database_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with store(database_url, data) as ctx:
        finished = await done_batch(ctx)
        assert await finalize_batch(ctx, finished)
        kept = folders(data)
        leased, lapsed = await done_batch(ctx), await done_batch(ctx)
        for batch_id, until in ((leased, time.time() + 60), (lapsed, time.time() - 1)):
            async with ctx.sessions() as session, session.begin():
                await session.execute(
                    update(BatchRow)
                    .where(BatchRow.id == batch_id)
                    .values(finalize_owner="someone-else", finalize_lease_until=until)
                )
        stray = {
            f"batches/{finished}/dead1/output.jsonl": b"{}\n",  # a finished batch's loser
            f"batches/{finished}/dead1/.tmp-xyzerrors.jsonl": b"{",  # killed mid-write
            f"batches/{leased}/live/output.jsonl": b"{}\n",  # someone is writing it now
            f"batches/{lapsed}/gone/output.jsonl": b"{}\n",  # its writer's lease lapsed
            "batches/batch_unknown/a/output.jsonl": b"{}\n",  # no such batch
        }
        for key, body in stray.items():
            path = data / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
        (data / f"batches/{finished}/empty-old-attempt").mkdir()
        assert await sweep_stale_attempts(ctx) == 3
        assert folders(data) == sorted(
            [*kept, f"{leased}", f"{leased}/live", f"{leased}/live/output.jsonl"]
        )
        assert await sweep_stale_attempts(ctx) == 0
