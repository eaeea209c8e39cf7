"""Every database statement in one place. Callers own the transaction (no commits here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.protocol.batch import TERMINAL_STATUSES
from vllm_batch.store.models import BatchRow, ChunkRow, FileRow, ResultRow
from vllm_batch.store.notify import notify_work

# ---------------------------------------------------------------- files


async def get_file(session: AsyncSession, file_id: str) -> FileRow | None:
    return await session.get(FileRow, file_id)


async def list_files(
    session: AsyncSession, *, purpose: str | None, limit: int, after: str | None, order: str
) -> Sequence[FileRow]:
    """A page of files ordered by id (ids are time-ordered), one extra row for ``has_more``."""
    query = select(FileRow)
    if purpose:
        query = query.where(FileRow.purpose == purpose)
    descending = order == "desc"
    if after:
        query = query.where(FileRow.id < after if descending else FileRow.id > after)
    query = query.order_by(FileRow.id.desc() if descending else FileRow.id.asc())
    return (await session.scalars(query.limit(limit + 1))).all()


async def expired_files(session: AsyncSession, now: int, limit: int = 500) -> Sequence[FileRow]:
    """Files past ``expires_at`` that no running batch reads."""
    in_use = (
        select(BatchRow.id)
        .where(BatchRow.input_file_id == FileRow.id, BatchRow.status.not_in(TERMINAL_STATUSES))
        .exists()
    )
    query = select(FileRow).where(FileRow.expires_at < now, ~in_use).limit(limit)
    return (await session.scalars(query)).all()


async def delete_file(session: AsyncSession, file_id: str) -> None:
    await session.execute(delete(FileRow).where(FileRow.id == file_id))


async def file_used_by_active_batch(session: AsyncSession, file_id: str) -> str | None:
    """The id of a non-terminal batch reading ``file_id``, if any."""
    query = select(BatchRow.id).where(
        BatchRow.input_file_id == file_id, BatchRow.status.not_in(TERMINAL_STATUSES)
    )
    return (await session.scalars(query.limit(1))).first()


# ---------------------------------------------------------------- batches


async def get_batch(session: AsyncSession, batch_id: str) -> BatchRow | None:
    return await session.get(BatchRow, batch_id, populate_existing=True)


async def list_batches(
    session: AsyncSession, *, limit: int, after: str | None
) -> Sequence[BatchRow]:
    """Newest first, one extra row for ``has_more``."""
    query = select(BatchRow)
    if after:
        query = query.where(BatchRow.id < after)
    query = query.order_by(BatchRow.id.desc()).limit(limit + 1)
    return (await session.scalars(query)).all()


async def batches_with_status(session: AsyncSession, status: str) -> Sequence[str]:
    return (await session.scalars(select(BatchRow.id).where(BatchRow.status == status))).all()


async def count_batches_by_status(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(BatchRow.status, func.count()).group_by(BatchRow.status))
    return {status: count for status, count in rows.tuples()}


async def fail_validation(
    session: AsyncSession, batch_id: str, errors: list[dict[str, object]], now: int
) -> bool:
    """``validating`` → ``failed`` with ``errors``; False if the batch moved on meanwhile."""
    result = await session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.status == "validating")
        .values(status="failed", errors=errors, failed_at=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def start_batch(
    session: AsyncSession,
    batch_id: str,
    *,
    model: str,
    total: int,
    chunks: list[tuple[int, int, int]],
    now: int,
) -> bool:
    """``validating`` → ``in_progress`` and enqueue ``chunks`` of (start_line, end_line, offset)."""
    result = await session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.status == "validating")
        .values(status="in_progress", in_progress_at=now, model=model, total=total)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    session.add_all(
        ChunkRow(
            id=f"{batch_id}:{idx}",
            batch_id=batch_id,
            idx=idx,
            model=model,
            start_line=start,
            end_line=end,
            start_offset=offset,
            status="queued",
            attempts=0,
        )
        for idx, (start, end, offset) in enumerate(chunks)
    )
    await notify_work(session)
    return True


async def request_stop(session: AsyncSession, batch_id: str, reason: str, now: int) -> bool:
    """Ask a running batch to stop: ``cancel`` (→ cancelling) or ``expire``."""
    values: dict[str, object] = {"stop_reason": reason}
    if reason == "cancel":
        values.update(status="cancelling", cancelling_at=now)
    result = await session.execute(
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            BatchRow.status.in_(("validating", "in_progress")),
            BatchRow.stop_reason.is_(None),
        )
        .values(**values)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def batch_stop_reason(session: AsyncSession, batch_id: str) -> str | None:
    return (
        await session.scalars(select(BatchRow.stop_reason).where(BatchRow.id == batch_id))
    ).first()


async def overdue_batches(session: AsyncSession, now: int) -> Sequence[str]:
    """Running batches whose completion window has passed."""
    query = select(BatchRow.id).where(
        BatchRow.status.in_(("validating", "in_progress")),
        BatchRow.stop_reason.is_(None),
        BatchRow.expires_at < now,
    )
    return (await session.scalars(query)).all()


# ---------------------------------------------------------------- chunks and leases


async def claim_chunk(
    session: AsyncSession, *, owner: str, models: Sequence[str], now: float, lease: float
) -> ChunkRow | None:
    """Lease the next runnable chunk (queued, or whose lease expired) for one of ``models``.

    Oldest batch first (higher ``priority`` before), then chunk order. On PostgreSQL the
    candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so workers never collide;
    SQLite serialises writers, so the same statement is safe there.
    """
    candidate = (
        select(ChunkRow.id)
        .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
        .where(
            ChunkRow.model.in_(models),
            BatchRow.status == "in_progress",
            BatchRow.stop_reason.is_(None),
            or_(
                ChunkRow.status == "queued",
                and_(ChunkRow.status == "running", ChunkRow.lease_until < now),
            ),
        )
        .order_by(BatchRow.priority.desc(), BatchRow.created_at, BatchRow.id, ChunkRow.idx)
        .limit(1)
        .with_for_update(of=ChunkRow, skip_locked=True)
        .scalar_subquery()
    )
    result = await session.execute(
        update(ChunkRow)
        .where(ChunkRow.id == candidate)
        .values(
            status="running",
            lease_owner=owner,
            lease_until=now + lease,
            attempts=ChunkRow.attempts + 1,
        )
        .returning(ChunkRow)
        .execution_options(synchronize_session=False)
    )
    return result.scalars().first()


async def renew_lease(session: AsyncSession, chunk_id: str, owner: str, until: float) -> bool:
    """Extend our lease; False if another worker took the chunk over."""
    result = await session.execute(
        update(ChunkRow)
        .where(ChunkRow.id == chunk_id, ChunkRow.lease_owner == owner, ChunkRow.status == "running")
        .values(lease_until=until)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def finish_chunk(session: AsyncSession, chunk_id: str, owner: str) -> None:
    await session.execute(
        update(ChunkRow)
        .where(ChunkRow.id == chunk_id, ChunkRow.lease_owner == owner)
        .values(status="done", lease_until=None)
    )


async def release_chunk(
    session: AsyncSession, chunk_id: str, owner: str, *, engine_failure: bool = False
) -> None:
    """Hand a chunk back to the queue (graceful shutdown, or the batch is stopping).

    ``engine_failure``: placeholder until the lead's version lands (it counts one real
    engine failure toward ``max_chunk_attempts``); accepted and ignored here.
    """
    await session.execute(
        update(ChunkRow)
        .where(ChunkRow.id == chunk_id, ChunkRow.lease_owner == owner, ChunkRow.status == "running")
        .values(status="queued", lease_owner=None, lease_until=None)
    )
    await notify_work(session)


async def chunk_summary(session: AsyncSession, batch_id: str, now: float) -> tuple[int, int]:
    """(chunks not yet done, chunks under a live lease) for ``batch_id``."""
    undone = func.sum(func.cast(ChunkRow.status != "done", type_=ChunkRow.idx.type))
    live = func.sum(
        func.cast(
            and_(ChunkRow.status == "running", ChunkRow.lease_until >= now),
            type_=ChunkRow.idx.type,
        )
    )
    row = (await session.execute(select(undone, live).where(ChunkRow.batch_id == batch_id))).one()
    return int(row[0] or 0), int(row[1] or 0)


async def queue_depth(session: AsyncSession) -> dict[str, int]:
    """Chunks by status, for ``/`` and ``/ready``."""
    rows = await session.execute(select(ChunkRow.status, func.count()).group_by(ChunkRow.status))
    return {status: count for status, count in rows.tuples()}


async def lease_owners(session: AsyncSession, prefix: str) -> set[str]:
    """Owners (worker ids starting with ``prefix``) of live chunk or finalization leases."""
    chunk_owners = select(ChunkRow.lease_owner).where(
        ChunkRow.status == "running", ChunkRow.lease_owner.startswith(prefix, autoescape=True)
    )
    batch_owners = select(BatchRow.finalize_owner).where(
        BatchRow.finalize_lease_until.is_not(None),
        BatchRow.finalize_owner.startswith(prefix, autoescape=True),
    )
    rows = (await session.scalars(chunk_owners.union(batch_owners))).all()
    return {owner for owner in rows if owner}


async def release_owner(session: AsyncSession, owner: str) -> None:
    """Drop every lease held by ``owner`` (a worker known to be dead)."""
    await session.execute(
        update(ChunkRow)
        .where(ChunkRow.lease_owner == owner, ChunkRow.status == "running")
        .values(status="queued", lease_owner=None, lease_until=None)
    )
    await session.execute(
        update(BatchRow)
        .where(BatchRow.finalize_owner == owner)
        .values(finalize_lease_until=None, finalize_owner=None)
    )
    await notify_work(session)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class LineResult:
    """A finished input line ready to be saved."""

    line: int
    is_error: bool
    data: str
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


async def save_results(session: AsyncSession, batch_id: str, results: Sequence[LineResult]) -> int:
    """Insert results once each and add only the new ones to the batch's counts and usage.

    A line already saved (e.g. by a worker whose lease was taken over) is skipped, so
    counts stay exact. Returns how many lines were new.
    """
    if not results:
        return 0
    dialect = session.get_bind().dialect.name
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    table = cast(Table, ResultRow.__table__)
    # Core executemany ("insertmanyvalues"): no per-row ORM work, RETURNING the new lines.
    statement = (
        insert_fn(table)
        .on_conflict_do_nothing(index_elements=["batch_id", "line"])
        .returning(table.c.line)
    )
    rows = [
        {"batch_id": batch_id, "line": r.line, "is_error": r.is_error, "data": r.data}
        for r in results
    ]
    inserted = set((await session.scalars(statement, rows)).all())
    new = [r for r in results if r.line in inserted]
    if new:
        failed = sum(r.is_error for r in new)
        await session.execute(
            update(BatchRow)
            .where(BatchRow.id == batch_id)
            .values(
                completed=BatchRow.completed + (len(new) - failed),
                failed=BatchRow.failed + failed,
                input_tokens=BatchRow.input_tokens + sum(r.input_tokens for r in new),
                cached_tokens=BatchRow.cached_tokens + sum(r.cached_tokens for r in new),
                output_tokens=BatchRow.output_tokens + sum(r.output_tokens for r in new),
                reasoning_tokens=BatchRow.reasoning_tokens + sum(r.reasoning_tokens for r in new),
            )
        )
    return len(new)


async def done_lines(session: AsyncSession, batch_id: str, start: int, end: int) -> set[int]:
    """Line indexes in ``[start, end)`` that already have a saved result."""
    query = select(ResultRow.line).where(
        ResultRow.batch_id == batch_id, ResultRow.line >= start, ResultRow.line < end
    )
    return set((await session.scalars(query)).all())


async def count_done_lines(session: AsyncSession, batch_id: str, start: int, end: int) -> int:
    query = select(func.count()).where(
        ResultRow.batch_id == batch_id, ResultRow.line >= start, ResultRow.line < end
    )
    return int((await session.scalar(query)) or 0)


async def stream_results(
    session: AsyncSession, batch_id: str, batch_size: int = 2000
) -> AsyncIterator[tuple[int, bool, str]]:
    """Saved results in input order, fetched ``batch_size`` at a time (bounded memory)."""
    last = -1
    while True:
        rows = (
            (
                await session.execute(
                    select(ResultRow.line, ResultRow.is_error, ResultRow.data)
                    .where(ResultRow.batch_id == batch_id, ResultRow.line > last)
                    .order_by(ResultRow.line)
                    .limit(batch_size)
                )
            )
            .tuples()
            .all()
        )
        if not rows:
            return
        for line, is_error, data in rows:
            yield line, is_error, data
        last = rows[-1][0]


async def delete_results(session: AsyncSession, batch_id: str) -> None:
    await session.execute(delete(ResultRow).where(ResultRow.batch_id == batch_id))


# ---------------------------------------------------------------- finalization


async def claim_finalization(
    session: AsyncSession, batch_id: str, *, owner: str, now: float, lease: float
) -> BatchRow | None:
    """Take the right to write a batch's output files, if nobody holds it.

    Ready means: running with every chunk done, or asked to stop with no live lease left.
    The batch moves to ``finalizing`` (unless it is ``cancelling``).
    """
    batch = await session.get(BatchRow, batch_id, populate_existing=True, with_for_update=True)
    if batch is None or batch.status in TERMINAL_STATUSES:
        return None
    if batch.finalize_lease_until is not None and batch.finalize_lease_until >= now:
        return None
    undone, live = await chunk_summary(session, batch_id, now)
    if batch.stop_reason is None:
        if batch.status not in ("in_progress", "finalizing") or undone:
            return None
    elif live:
        return None
    batch.finalize_lease_until = now + lease
    batch.finalize_owner = owner
    if batch.status == "in_progress":
        batch.status = "finalizing"
        batch.finalizing_at = int(now)
    return batch


async def finalization_candidates(session: AsyncSession, now: float) -> Sequence[str]:
    """Batches that may be ready for output assembly (checked precisely when claimed)."""
    lease_free = or_(BatchRow.finalize_lease_until.is_(None), BatchRow.finalize_lease_until < now)
    pending = (
        select(ChunkRow.id)
        .where(ChunkRow.batch_id == BatchRow.id, ChunkRow.status != "done")
        .exists()
    )
    query = select(BatchRow.id).where(
        lease_free,
        or_(
            and_(BatchRow.status == "in_progress", BatchRow.stop_reason.is_(None), ~pending),
            BatchRow.status == "finalizing",
            and_(
                BatchRow.stop_reason.is_not(None),
                BatchRow.status.in_(("validating", "in_progress", "cancelling")),
            ),
        ),
    )
    return (await session.scalars(query)).all()
