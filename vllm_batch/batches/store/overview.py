"""Read-only queries behind the dashboard: queue per model, chunk progress, first errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.batches.states import ChunkStatus
from vllm_batch.batches.store.rows import ChunkRow, ResultRow


@dataclass
class ModelBacklog:
    """Chunks (and their lines) waiting for or running on one model."""

    model: str
    queued_chunks: int = 0
    running_chunks: int = 0
    queued_lines: int = 0
    running_lines: int = 0
    batches: int = 0


async def queue_by_model(session: AsyncSession) -> list[ModelBacklog]:
    """Queued and running chunks per model, with their line counts and batch count."""
    lines = func.sum(ChunkRow.end_line - ChunkRow.start_line)
    rows = await session.execute(
        select(ChunkRow.model, ChunkRow.status, func.count(), lines)
        .where(ChunkRow.status.in_([ChunkStatus.QUEUED, ChunkStatus.RUNNING]))
        .group_by(ChunkRow.model, ChunkRow.status)
    )
    queues: dict[str, ModelBacklog] = {}
    for model, status, count, line_sum in rows.tuples():
        queue = queues.setdefault(model, ModelBacklog(model))
        if status == ChunkStatus.QUEUED:
            queue.queued_chunks, queue.queued_lines = int(count), int(line_sum or 0)
        else:
            queue.running_chunks, queue.running_lines = int(count), int(line_sum or 0)
    batches = await session.execute(
        select(ChunkRow.model, func.count(func.distinct(ChunkRow.batch_id)))
        .where(ChunkRow.status.in_([ChunkStatus.QUEUED, ChunkStatus.RUNNING]))
        .group_by(ChunkRow.model)
    )
    for model, count in batches.tuples():
        queues[model].batches = int(count)
    return [queues[name] for name in sorted(queues)]


async def active_leases(session: AsyncSession, now: float) -> Sequence[tuple[str, str, float]]:
    """``(owner, model, lease_until)`` of every running chunk whose lease is live."""
    rows = await session.execute(
        select(ChunkRow.lease_owner, ChunkRow.model, ChunkRow.lease_until).where(
            ChunkRow.status == ChunkStatus.RUNNING,
            ChunkRow.lease_owner.is_not(None),
            ChunkRow.lease_until >= now,
        )
    )
    return [(str(owner), str(model), float(until or 0)) for owner, model, until in rows.tuples()]


async def batch_chunks(session: AsyncSession, batch_id: str, limit: int) -> Sequence[ChunkRow]:
    """The batch's chunks in order, at most ``limit + 1`` (one extra for ``has_more``)."""
    query = select(ChunkRow).where(ChunkRow.batch_id == batch_id).order_by(ChunkRow.idx)
    return (await session.scalars(query.limit(limit + 1))).all()


async def saved_lines(session: AsyncSession, chunks: Sequence[ChunkRow]) -> dict[str, int]:
    """Saved result lines per chunk, for the chunks that are not done yet."""
    open_chunks = [c.id for c in chunks if c.status != ChunkStatus.DONE]
    if not open_chunks:
        return {}
    joined = and_(
        ResultRow.batch_id == ChunkRow.batch_id,
        ResultRow.line >= ChunkRow.start_line,
        ResultRow.line < ChunkRow.end_line,
    )
    rows = await session.execute(
        select(ChunkRow.id, func.count(ResultRow.line))
        .select_from(ChunkRow)
        .join(ResultRow, joined)
        .where(ChunkRow.id.in_(open_chunks))
        .group_by(ChunkRow.id)
    )
    return {chunk_id: int(count) for chunk_id, count in rows.tuples()}


async def first_error_rows(
    session: AsyncSession, batch_ids: Sequence[str], per_batch: int
) -> dict[str, list[tuple[int, str]]]:
    """Up to ``per_batch`` saved error lines ``(line, data)`` per batch, lowest lines first."""
    if not batch_ids:
        return {}
    rank = (
        func.row_number()
        .over(partition_by=ResultRow.batch_id, order_by=ResultRow.line)
        .label("rank")
    )
    ranked = (
        select(ResultRow.batch_id, ResultRow.line, ResultRow.data, rank)
        .where(ResultRow.batch_id.in_(batch_ids), ResultRow.is_error.is_(True))
        .subquery()
    )
    rows = await session.execute(
        select(ranked.c.batch_id, ranked.c.line, ranked.c.data)
        .where(ranked.c.rank <= per_batch)
        .order_by(ranked.c.batch_id, ranked.c.line)
    )
    found: dict[str, list[tuple[int, str]]] = {}
    for batch_id, line, data in rows.tuples():
        found.setdefault(batch_id, []).append((int(line), data))
    return found
