"""Read-only statements behind the dashboard's history sampler (a few rows every few seconds).

Both touch indexed columns only: the batch status index plus a primary-key range (batch
ids sort by creation time, ``protocol/ids.py``) and the chunks' ``(status, model)`` index,
so a sample costs the same however many finished batches the database holds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.batches.states import ACTIVE, ChunkStatus
from vllm_batch.batches.store.rows import BatchRow, ChunkRow

LIVE = ACTIVE
"""The statuses whose counters can still change (``states.ACTIVE``)."""


@dataclass(frozen=True)
class BatchCounts:
    """One batch's counters as a sample reads them."""

    id: str
    owner: str | None
    status: str
    completed: int
    failed: int
    output_tokens: int


async def sampled_batches(
    session: AsyncSession, *, created_from_id: str, also: Collection[str] = ()
) -> list[BatchCounts]:
    """Counters of live batches, of batches whose id is ``>= created_from_id`` (made since
    then, whatever their status) and of the batches ``also`` names (seen live before)."""
    wanted = [BatchRow.status.in_(LIVE), BatchRow.id >= created_from_id]
    if also:
        wanted.append(BatchRow.id.in_(list(also)))
    rows = await session.execute(
        select(
            BatchRow.id,
            BatchRow.owner,
            BatchRow.status,
            BatchRow.completed,
            BatchRow.failed,
            BatchRow.output_tokens,
        ).where(or_(*wanted))
    )
    return [
        BatchCounts(str(i), owner, str(status), int(done or 0), int(bad or 0), int(tokens or 0))
        for i, owner, status, done, bad, tokens in rows.tuples()
    ]


async def open_lines_by_batch(session: AsyncSession) -> dict[str, tuple[int, int]]:
    """``batch id -> (queued lines, running lines)`` of unfinished chunks."""
    lines = func.sum(ChunkRow.end_line - ChunkRow.start_line)
    rows = await session.execute(
        select(ChunkRow.batch_id, ChunkRow.status, lines)
        .where(ChunkRow.status.in_([ChunkStatus.QUEUED, ChunkStatus.RUNNING]))
        .group_by(ChunkRow.batch_id, ChunkRow.status)
    )
    found: dict[str, tuple[int, int]] = {}
    for batch_id, status, count in rows.tuples():
        queued, running = found.get(batch_id, (0, 0))
        if status == ChunkStatus.QUEUED:
            queued = int(count or 0)
        else:
            running = int(count or 0)
        found[batch_id] = (queued, running)
    return found
