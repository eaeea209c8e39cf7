"""Read-only aggregate statements for ``/metrics``: a handful of ``GROUP BY`` per scrape.

Each touches indexed columns (batch status, chunk status+model, delivery status) and only
live rows (in-progress batches, unfinished chunks, pending or failed deliveries), so a
scrape costs the same however many finished batches the database holds, except for the
batches-by-status count.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.batches.states import BatchStatus, ChunkStatus, DeliveryStatus
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow, ChunkRow, DeliveryRow


@dataclass(frozen=True)
class ModelQueue:
    """One model's share of the queue."""

    lines: int = 0
    batches: int = 0
    queued_chunks: int = 0
    running_chunks: int = 0
    expired_leases: int = 0
    oldest_age: float = 0.0


async def batches_by_status(session: AsyncSession) -> dict[str, int]:
    """Every key's batches by status (the same count ``/`` shows an admin)."""
    return await queries.count_batches_by_status(session)


async def queue_by_model(session: AsyncSession, now: float) -> dict[str, ModelQueue]:
    """Remaining lines, waiting batches, chunks and stale leases of in-progress work."""
    in_progress = BatchRow.status == BatchStatus.IN_PROGRESS
    lines = await session.execute(
        select(
            BatchRow.model,
            func.sum(BatchRow.total - BatchRow.completed - BatchRow.failed),
            func.min(func.coalesce(BatchRow.in_progress_at, BatchRow.created_at)),
        )
        .where(in_progress)
        .group_by(BatchRow.model)
    )
    found: dict[str, dict[str, float]] = {}
    for model, remaining, oldest in lines.tuples():
        found.setdefault(str(model or ""), {}).update(
            lines=int(remaining or 0), oldest_age=max(0.0, now - float(oldest)) if oldest else 0.0
        )
    running = ChunkRow.status == ChunkStatus.RUNNING
    chunks = await session.execute(
        select(
            ChunkRow.model,
            func.count(func.distinct(ChunkRow.batch_id)),
            func.sum(case((ChunkRow.status == ChunkStatus.QUEUED, 1), else_=0)),
            func.sum(case((running, 1), else_=0)),
            func.sum(case((running & (ChunkRow.lease_until < now), 1), else_=0)),
        )
        .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
        .where(ChunkRow.status.in_((ChunkStatus.QUEUED, ChunkStatus.RUNNING)), in_progress)
        .group_by(ChunkRow.model)
    )
    for model, batches, queued, running_count, expired in chunks.tuples():
        found.setdefault(str(model), {}).update(
            batches=int(batches or 0),
            queued_chunks=int(queued or 0),
            running_chunks=int(running_count or 0),
            expired_leases=int(expired or 0),
        )
    return {
        model: ModelQueue(
            lines=int(v.get("lines", 0)),
            batches=int(v.get("batches", 0)),
            queued_chunks=int(v.get("queued_chunks", 0)),
            running_chunks=int(v.get("running_chunks", 0)),
            expired_leases=int(v.get("expired_leases", 0)),
            oldest_age=float(v.get("oldest_age", 0.0)),
        )
        for model, v in found.items()
    }


async def open_deliveries(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Pending and failed (given up) deliveries by ``(kind, status)``."""
    rows = await session.execute(
        select(DeliveryRow.kind, DeliveryRow.status, func.count())
        .where(DeliveryRow.status.in_((DeliveryStatus.PENDING, DeliveryStatus.FAILED)))
        .group_by(DeliveryRow.kind, DeliveryRow.status)
    )
    return {(str(kind), str(status)): int(n) for kind, status, n in rows.tuples()}
