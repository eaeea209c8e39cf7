"""Every database statement in one place. Callers own the transaction (no commits here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, delete, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.batches.policy import DAY, MAX_DEADLINE_FACTOR, NO_DEADLINE
from vllm_batch.batches.states import (
    ACTIVE,
    STOPPABLE,
    TERMINAL,
    BatchStatus,
    ChunkStatus,
    IllegalTransition,
    StopReason,
    UploadStatus,
    batch_sources,
    chunk_sources,
    upload_sources,
)
from vllm_batch.batches.store.notify import notify_work
from vllm_batch.batches.store.rows import (
    BatchRow,
    ChunkRow,
    DeliveryRow,
    FileRow,
    ResultRow,
    UploadPartRow,
    UploadRow,
)
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.protocol.file import FilePurpose

# ---------------------------------------------------------------- files


# ``owner`` arguments below: ``None`` sees every row (admin keys, internal callers); a key
# name sees only the rows that key created.


async def get_file(
    session: AsyncSession, file_id: str, *, owner: str | None = None
) -> FileRow | None:
    row = await session.get(FileRow, file_id)
    return row if row is not None and (owner is None or row.owner == owner) else None


async def list_files(
    session: AsyncSession,
    *,
    purpose: str | None,
    limit: int,
    after: str | None,
    order: str,
    owner: str | None = None,
) -> Sequence[FileRow]:
    """A page of files ordered by id (ids are time-ordered), one extra row for ``has_more``."""
    query = select(FileRow)
    if owner is not None:
        query = query.where(FileRow.owner == owner)
    if purpose:
        if purpose not in set(FilePurpose):
            return []  # no file can have a purpose the schema does not allow
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
        .where(BatchRow.input_file_id == FileRow.id, BatchRow.status.not_in(TERMINAL))
        .exists()
    )
    query = select(FileRow).where(FileRow.expires_at < now, ~in_use).limit(limit)
    return (await session.scalars(query)).all()


async def insert_file(session: AsyncSession, row: FileRow) -> None:
    session.add(row)
    await session.flush()


async def delete_file(session: AsyncSession, file_id: str) -> None:
    await session.execute(delete(FileRow).where(FileRow.id == file_id))


async def file_used_by_active_batch(session: AsyncSession, file_id: str) -> str | None:
    """The id of a non-terminal batch reading ``file_id``, if any."""
    query = select(BatchRow.id).where(
        BatchRow.input_file_id == file_id, BatchRow.status.not_in(TERMINAL)
    )
    return (await session.scalars(query.limit(1))).first()


# ---------------------------------------------------------------- uploads and parts


async def _insert_new(session: AsyncSession, row: UploadRow | BatchRow, start: str) -> None:
    """A new row, which must start in its first status ``start``."""
    if row.status != start:
        raise IllegalTransition(
            f"a new {row.__tablename__} row must be {start}, not '{row.status}'"
        )
    session.add(row)
    await session.flush()


async def insert_upload(session: AsyncSession, row: UploadRow) -> None:
    """A new upload; it always starts ``pending``."""
    await _insert_new(session, row, UploadStatus.PENDING)


async def get_upload(
    session: AsyncSession, upload_id: str, *, owner: str | None = None, lock: bool = False
) -> UploadRow | None:
    """The upload if ``owner`` may see it; ``lock`` holds it until commit (PostgreSQL
    ``FOR UPDATE``; a SQLite write session holds the write lock already)."""
    row = await session.get(UploadRow, upload_id, populate_existing=True, with_for_update=lock)
    return row if row is not None and (owner is None or row.owner == owner) else None


async def _move_upload(
    session: AsyncSession, upload_id: str, target: UploadStatus, now: int, **values: Any
) -> bool:
    """The one writer of ``uploads.status``: only a ``pending`` upload not yet expired moves
    (to ``expired`` only once it is past ``expires_at``)."""
    expiry = (
        UploadRow.expires_at <= now
        if target == UploadStatus.EXPIRED
        else UploadRow.expires_at > now
    )
    result = await session.execute(
        update(UploadRow)
        .where(UploadRow.id == upload_id, UploadRow.status.in_(upload_sources(target)), expiry)
        .values(status=target, **values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def complete_upload(session: AsyncSession, upload_id: str, file_id: str, now: int) -> bool:
    """``pending`` → ``completed`` with the assembled file; False if it moved meanwhile."""
    return await _move_upload(session, upload_id, UploadStatus.COMPLETED, now, file_id=file_id)


async def cancel_upload(session: AsyncSession, upload_id: str, now: int) -> bool:
    """``pending`` → ``cancelled``; False if it moved (or expired) meanwhile."""
    return await _move_upload(session, upload_id, UploadStatus.CANCELLED, now)


async def expire_uploads(session: AsyncSession, now: int, limit: int = 500) -> Sequence[str]:
    """``pending`` → ``expired`` for uploads past ``expires_at``; their ids."""
    query = select(UploadRow.id).where(
        UploadRow.status == UploadStatus.PENDING, UploadRow.expires_at <= now
    )
    expired = []
    for upload_id in (await session.scalars(query.limit(limit))).all():
        if await _move_upload(session, upload_id, UploadStatus.EXPIRED, now):
            expired.append(upload_id)
    return expired


async def insert_upload_part(session: AsyncSession, row: UploadPartRow) -> None:
    session.add(row)
    await session.flush()


async def upload_parts(
    session: AsyncSession, upload_id: str, part_ids: Sequence[str] | None = None
) -> Sequence[UploadPartRow]:
    """The upload's parts (those among ``part_ids`` if given), in no particular order."""
    query = select(UploadPartRow).where(UploadPartRow.upload_id == upload_id)
    if part_ids is not None:
        query = query.where(UploadPartRow.id.in_(part_ids))
    return (await session.scalars(query)).all()


async def finished_upload_parts(session: AsyncSession, limit: int = 500) -> Sequence[UploadPartRow]:
    """Parts left by uploads that are no longer ``pending`` (their blobs are garbage)."""
    query = (
        select(UploadPartRow)
        .join(UploadRow, UploadRow.id == UploadPartRow.upload_id)
        .where(UploadRow.status != UploadStatus.PENDING)
        .limit(limit)
    )
    return (await session.scalars(query)).all()


async def delete_upload_parts(session: AsyncSession, part_ids: Sequence[str]) -> None:
    """Delete these part rows. The request that ended an upload and housekeeping may both
    delete its parts: on PostgreSQL, rows another deleter holds are skipped, and the rest
    are locked in id order, so the two never deadlock."""
    if not part_ids:
        return
    free = (
        select(UploadPartRow.id)
        .where(UploadPartRow.id.in_(part_ids))
        .order_by(UploadPartRow.id)
        .with_for_update(skip_locked=True)
    )
    await session.execute(delete(UploadPartRow).where(UploadPartRow.id.in_(free.scalar_subquery())))


# ---------------------------------------------------------------- batches


async def get_batch(
    session: AsyncSession, batch_id: str, *, owner: str | None = None
) -> BatchRow | None:
    row = await session.get(BatchRow, batch_id, populate_existing=True)
    return row if row is not None and (owner is None or row.owner == owner) else None


async def list_batches(
    session: AsyncSession, *, limit: int, after: str | None, owner: str | None = None
) -> Sequence[BatchRow]:
    """Newest first, one extra row for ``has_more``."""
    query = select(BatchRow)
    if owner is not None:
        query = query.where(BatchRow.owner == owner)
    if after:
        query = query.where(BatchRow.id < after)
    query = query.order_by(BatchRow.id.desc()).limit(limit + 1)
    return (await session.scalars(query)).all()


async def batches_with_status(session: AsyncSession, status: str) -> Sequence[str]:
    return (await session.scalars(select(BatchRow.id).where(BatchRow.status == status))).all()


async def count_batches_by_status(
    session: AsyncSession, *, owner: str | None = None
) -> dict[str, int]:
    query = select(BatchRow.status, func.count()).group_by(BatchRow.status)
    if owner is not None:
        query = query.where(BatchRow.owner == owner)
    rows = await session.execute(query)
    return {status: count for status, count in rows.tuples()}


async def lock_batch(session: AsyncSession, batch_id: str) -> BatchRow | None:
    """Read ``batch_id`` and hold it until commit, so racing writers of it serialise.

    PostgreSQL locks the row (``FOR UPDATE``); a SQLite write session already holds the
    database's write lock since its ``BEGIN IMMEDIATE``.
    """
    return await session.get(BatchRow, batch_id, populate_existing=True, with_for_update=True)


def _rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


async def _move_batch(
    session: AsyncSession, batch_id: str, target: BatchStatus, *where: Any, **values: Any
) -> bool:
    """The one writer of ``batches.status``: guarded by the sources ``states`` allows."""
    result = await session.execute(
        update(BatchRow)
        .where(BatchRow.id == batch_id, BatchRow.status.in_(batch_sources(target)), *where)
        .values(status=target, **values)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def _leave_validating(
    session: AsyncSession, batch_id: str, target: BatchStatus, **values: Any
) -> bool:
    """``validating`` → ``target`` (``in_progress`` or ``failed``), unless a stop was asked."""
    return await _move_batch(session, batch_id, target, BatchRow.stop_reason.is_(None), **values)


async def insert_batch(session: AsyncSession, row: BatchRow) -> None:
    """A new batch; it always starts ``validating``."""
    await _insert_new(session, row, BatchStatus.VALIDATING)


async def fail_validation(
    session: AsyncSession,
    batch_id: str,
    errors: list[dict[str, object]],
    now: int,
    deliveries: Sequence[DeliveryRow] = (),
) -> bool:
    """``validating`` → ``failed`` with ``errors``; False if the batch moved on meanwhile.

    ``deliveries`` (the final event's outbox rows) are added in the same transaction.
    """
    moved = await _leave_validating(
        session, batch_id, BatchStatus.FAILED, errors=errors, failed_at=now
    )
    if moved:
        session.add_all(deliveries)
        await session.flush()
    return moved


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
    moved = await _leave_validating(
        session, batch_id, BatchStatus.IN_PROGRESS, in_progress_at=now, model=model, total=total
    )
    if not moved:
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
            status=ChunkStatus.QUEUED,
            attempts=0,
            engine_failures=0,
        )
        for idx, (start, end, offset) in enumerate(chunks)
    )
    await notify_work(session)
    return True


async def mark_first_line_started(session: AsyncSession, batch_id: str, at: float) -> bool:
    """Record ``at`` as the time the batch's first line went to the engine, unless an earlier
    time is recorded already (a resumed or later chunk never moves it); False if not."""
    result = await session.execute(
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            or_(BatchRow.first_line_started_at.is_(None), BatchRow.first_line_started_at > at),
        )
        .values(first_line_started_at=at)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


async def request_stop(session: AsyncSession, batch_id: str, reason: StopReason, now: int) -> bool:
    """Ask a running batch to stop: cancel (→ ``cancelling``) or expire (status kept)."""
    guard = (BatchRow.status.in_(STOPPABLE), BatchRow.stop_reason.is_(None))
    if reason is StopReason.CANCEL:
        return await _move_batch(
            session,
            batch_id,
            BatchStatus.CANCELLING,
            *guard,
            stop_reason=reason,
            cancelling_at=now,
        )
    result = await session.execute(
        update(BatchRow).where(BatchRow.id == batch_id, *guard).values(stop_reason=reason)
    )
    return _rowcount(result) == 1


async def overdue_batches(session: AsyncSession, now: int) -> Sequence[str]:
    """Running batches whose completion window has passed."""
    query = select(BatchRow.id).where(
        BatchRow.status.in_(STOPPABLE),
        BatchRow.stop_reason.is_(None),
        BatchRow.expires_at < now,
    )
    return (await session.scalars(query)).all()


# ---------------------------------------------------------------- chunks and leases


@dataclass(frozen=True)
class Claim:
    """A chunk just leased, and whether it was taken over from an expired lease."""

    chunk: ChunkRow
    lease_expired: bool


@dataclass(frozen=True)
class ClaimOrder:
    """What the claim order needs besides the rows (see ``claim_chunk``)."""

    seconds_per_line: float = 0.0
    """The claimer's recent time per finished line, to estimate a batch's remaining work."""
    deadline_margin: float = 0.25
    """A batch is at risk when its estimated finish leaves less than this fraction of its
    completion window."""


def _runnable(now: float) -> Any:
    return or_(
        ChunkRow.status == ChunkStatus.QUEUED,
        and_(ChunkRow.status == ChunkStatus.RUNNING, ChunkRow.lease_until < now),
    )


def _running_chunks(now: float) -> Any:
    """Chunks of the outer batch row leased right now (by any worker)."""
    running = ChunkRow.__table__.alias("running")
    return (
        select(func.count())
        .select_from(running)
        .where(
            running.c.batch_id == BatchRow.id,
            running.c.status == ChunkStatus.RUNNING,
            running.c.lease_until >= now,
        )
        .correlate(BatchRow)
        .scalar_subquery()
    )


def priority_weight_sql() -> Any:
    """``metadata.priority`` as shares, as ``policy.priority_weight`` computes it."""
    return case(
        (BatchRow.priority >= 0, BatchRow.priority + 1.0),
        else_=1.0 / (1.0 - BatchRow.priority),
    )


@dataclass(frozen=True)
class OrderTerms:
    """``policy.batch_order`` as SQL expressions over ``BatchRow``."""

    weight: Any
    latest_start: Any
    urgent: Any
    """1 for a batch at risk, else 0."""


def order_terms(now: float, order: ClaimOrder) -> OrderTerms:
    """The claim order's per-batch terms, computed exactly as ``batch_order`` does."""
    remaining = BatchRow.total - BatchRow.completed - BatchRow.failed
    expires = func.coalesce(BatchRow.expires_at, now + NO_DEADLINE)
    latest_start = expires - remaining * order.seconds_per_line
    window = func.coalesce(BatchRow.expires_at - BatchRow.created_at, DAY)
    slack = latest_start - now
    deadline_factor = case(
        (slack <= DAY / MAX_DEADLINE_FACTOR, MAX_DEADLINE_FACTOR),
        (slack >= DAY, 1.0),
        else_=DAY / slack,
    )
    return OrderTerms(
        weight=priority_weight_sql() * deadline_factor,
        latest_start=latest_start,
        urgent=case((slack < order.deadline_margin * window, 1), else_=0),
    )


async def claim_chunk(
    session: AsyncSession,
    *,
    owner: str,
    models: Sequence[str],
    now: float,
    lease: float,
    order: ClaimOrder = ClaimOrder(),
    exclude_batches: Collection[str] = (),
    exclude_chunks: Collection[str] = (),
) -> Claim | None:
    """Lease the next runnable chunk (queued, or whose lease expired) for one of ``models``.

    The order, across every worker:

    1. batches at risk of missing their deadline (least slack first), where slack is the
       time left after the estimated remaining work (``order``);
    2. the fewest chunks running per share, so batches interleave and a small batch never
       waits for a large one to finish. Shares: ``p + 1`` for priority ``p`` (``1 / (1 - p)``
       below zero), times ``1 day / slack`` (1 to 1440, ``policy.deadline_factor``):
       a ``1h`` batch gets about 24 times the share of a ``24h`` one;
    3. higher priority, then the latest possible start (deadline minus remaining work:
       earliest deadline first among equal priorities);
    4. oldest batch, chunk order.

    ``exclude_batches`` leaves out batches the claimer already runs, ``exclude_chunks``
    the chunks it holds (their leases may have expired during a database outage). On PostgreSQL the
    candidate row is locked with ``FOR UPDATE SKIP LOCKED`` so workers never collide;
    SQLite write sessions serialise from ``BEGIN IMMEDIATE``. The guarded ``UPDATE``
    re-checks that the chunk is still runnable.
    """
    runnable = _runnable(now)
    terms = order_terms(now, order)
    share = _running_chunks(now) / terms.weight
    conditions = [
        ChunkRow.model.in_(models),
        BatchRow.status == BatchStatus.IN_PROGRESS,
        BatchRow.stop_reason.is_(None),
        runnable,
    ]
    if exclude_batches:
        conditions.append(BatchRow.id.not_in(list(exclude_batches)))
    if exclude_chunks:
        conditions.append(ChunkRow.id.not_in(list(exclude_chunks)))
    candidate = (
        select(ChunkRow.id, ChunkRow.status)
        .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
        .where(*conditions)
        .order_by(
            terms.urgent.desc(),
            case((terms.urgent == 1, terms.latest_start), else_=0),
            share,
            BatchRow.priority.desc(),
            terms.latest_start,
            BatchRow.created_at,
            BatchRow.id,
            ChunkRow.idx,
        )
        .limit(1)
        .with_for_update(of=ChunkRow, skip_locked=True)
    )
    found = (await session.execute(candidate)).first()
    if found is None:
        return None
    result = await session.execute(
        _move_chunks(
            ChunkStatus.RUNNING,
            ChunkRow.id == found.id,
            runnable,
            lease_owner=owner,
            lease_until=now + lease,
            attempts=ChunkRow.attempts + 1,
        ).returning(ChunkRow)
    )
    chunk = result.scalars().first()
    if chunk is None:
        return None
    return Claim(chunk, lease_expired=found.status == ChunkStatus.RUNNING)


async def starved_models(
    session: AsyncSession, *, models: Sequence[str], now: float, max_wait: float
) -> list[str]:
    """Models of ``models`` with a batch in progress for over ``max_wait`` seconds that has
    runnable chunks and none running: a worker on another model should switch to them.

    Oldest first.
    """
    if not models:
        return []
    rows = await session.execute(
        select(ChunkRow.model, func.min(BatchRow.in_progress_at))
        .join(BatchRow, BatchRow.id == ChunkRow.batch_id)
        .where(
            ChunkRow.model.in_(models),
            BatchRow.status == BatchStatus.IN_PROGRESS,
            BatchRow.stop_reason.is_(None),
            BatchRow.in_progress_at < now - max_wait,
            _runnable(now),
            _running_chunks(now) == 0,
        )
        .group_by(ChunkRow.model)
    )
    return [model for model, _since in sorted(rows.all(), key=lambda row: row[1] or 0)]


def _move_chunks(target: ChunkStatus, *where: Any, **values: Any) -> Any:
    """The one writer of ``chunks.status``: guarded by the sources ``states`` allows."""
    return (
        update(ChunkRow)
        .where(ChunkRow.status.in_(chunk_sources(target)), *where)
        .values(status=target, **values)
        .execution_options(synchronize_session=False)
    )


def _held_by(chunk_id: str, owner: str) -> tuple[Any, ...]:
    return (
        ChunkRow.id == chunk_id,
        ChunkRow.lease_owner == owner,
        ChunkRow.status == ChunkStatus.RUNNING,
    )


async def renew_lease(session: AsyncSession, chunk_id: str, owner: str, until: float) -> bool:
    """Extend our lease; False if another worker took the chunk over."""
    result = await session.execute(
        update(ChunkRow).where(*_held_by(chunk_id, owner)).values(lease_until=until)
    )
    return _rowcount(result) == 1


async def finish_chunk(session: AsyncSession, chunk_id: str, owner: str) -> bool:
    """``running`` → ``done``, only while we hold the lease."""
    result = await session.execute(
        _move_chunks(ChunkStatus.DONE, *_held_by(chunk_id, owner), lease_until=None)
    )
    return _rowcount(result) == 1


async def release_chunk(
    session: AsyncSession, chunk_id: str, owner: str, *, engine_failure: bool = False
) -> bool:
    """``running`` → ``queued`` (shutdown, batch stopping, or the engine broke).

    Only ``engine_failure`` releases count toward ``max_chunk_attempts``.
    """
    values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
    if engine_failure:
        values["engine_failures"] = ChunkRow.engine_failures + 1
    result = await session.execute(
        _move_chunks(ChunkStatus.QUEUED, *_held_by(chunk_id, owner), **values)
    )
    await notify_work(session)
    return _rowcount(result) == 1


async def queue_depth(session: AsyncSession) -> dict[str, int]:
    """Chunks by status, for ``/`` and ``/ready``."""
    rows = await session.execute(select(ChunkRow.status, func.count()).group_by(ChunkRow.status))
    return {status: count for status, count in rows.tuples()}


async def lease_owners(session: AsyncSession, prefix: str) -> set[str]:
    """Owners (worker ids starting with ``prefix``) of live chunk or finalization leases."""
    chunk_owners = select(ChunkRow.lease_owner).where(
        ChunkRow.status == ChunkStatus.RUNNING,
        ChunkRow.lease_owner.startswith(prefix, autoescape=True),
    )
    batch_owners = select(BatchRow.finalize_owner).where(
        BatchRow.finalize_lease_until.is_not(None),
        BatchRow.finalize_owner.startswith(prefix, autoescape=True),
    )
    rows = (await session.scalars(chunk_owners.union(batch_owners))).all()
    return {owner for owner in rows if owner}


async def release_owner(session: AsyncSession, owner: str) -> int:
    """Drop every lease held by ``owner`` (a worker known to be dead): its running chunks go
    back to ``queued`` (how many is returned), its finalization leases lapse."""
    result = await session.execute(
        _move_chunks(
            ChunkStatus.QUEUED,
            ChunkRow.lease_owner == owner,
            ChunkRow.status == ChunkStatus.RUNNING,
            lease_owner=None,
            lease_until=None,
        )
    )
    await session.execute(
        update(BatchRow)
        .where(BatchRow.finalize_owner == owner)
        .values(finalize_lease_until=None, finalize_owner=None)
    )
    await notify_work(session)
    return _rowcount(result)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class SaveOutcome:
    """What a chunk's save learned: the lines new to the database, and any stop request."""

    stop_reason: str | None = None
    new: Sequence[LineResult] = ()
    """The results saved now (a line saved before, by an earlier lease holder, is not)."""

    @property
    def saved(self) -> int:
        return len(self.new)


async def save_chunk_results(
    session: AsyncSession,
    *,
    batch_id: str,
    chunk_id: str,
    owner: str,
    results: Sequence[LineResult],
    lease_until: float,
    now: float,
) -> SaveOutcome | None:
    """Renew our chunk lease and save ``results``, in one transaction, only if still ours
    (None: not ours any more, nothing written). New lines move the batch's
    ``last_line_finished_at`` forward to ``now``.

    The batch row is locked first, so a finalizer claiming it either runs before (and
    this save is refused: the batch is being finalized) or after (and sees these rows).
    A save that lost the lease or whose batch is finalizing or finished writes nothing.
    """
    batch = await lock_batch(session, batch_id)
    if batch is None or batch.status in TERMINAL or batch.finalize_owner is not None:
        return None
    if not await renew_lease(session, chunk_id, owner, lease_until):
        return None
    new = await _insert_results(session, batch_id, results, now)
    return SaveOutcome(stop_reason=batch.stop_reason, new=new)


# One statement saves a whole flush on PostgreSQL: the rows travel as three arrays (no
# per-row statement compilation), and RETURNING names the lines that were new.
_PG_INSERT_RESULTS = text(
    "INSERT INTO results (batch_id, line, is_error, data) "
    "SELECT :batch_id, * FROM unnest("
    "CAST(:lines AS integer[]), CAST(:errors AS boolean[]), CAST(:datas AS text[])) "
    "ON CONFLICT (batch_id, line) DO NOTHING RETURNING line"
)
# SQLite: a plain driver-level executemany (no RETURNING, which executemany cannot do).
_SQLITE_INSERT_RESULTS = (
    "INSERT INTO results (batch_id, line, is_error, data) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (batch_id, line) DO NOTHING"
)


async def _insert_results(
    session: AsyncSession, batch_id: str, results: Sequence[LineResult], now: float
) -> list[LineResult]:
    """Insert results once each and add only the new ones to the batch's counts and usage;
    if there are any, ``last_line_finished_at`` becomes ``now`` (never earlier than it was:
    workers' clocks may differ a little).

    A line already saved (e.g. by a worker whose lease was taken over) is skipped, so
    counts stay exact. Returns the new ones. The caller holds the batch row lock
    (``lock_batch``), so no other save of this batch runs meanwhile.
    """
    if not results:
        return []
    if len({r.line for r in results}) != len(results):  # a line twice: keep its first result
        results = list({r.line: r for r in reversed(results)}.values())
    if session.get_bind().dialect.name == "postgresql":
        params = {
            "batch_id": batch_id,
            "lines": [r.line for r in results],
            "errors": [r.is_error for r in results],
            "datas": [r.data for r in results],
        }
        inserted = set((await session.scalars(_PG_INSERT_RESULTS, params)).all())
        new = [r for r in results if r.line in inserted]
    else:
        # Under the write lock: the lines saved before are exactly the ones found now.
        lines = [r.line for r in results]
        saved = await done_lines(session, batch_id, min(lines), max(lines) + 1)
        new = [r for r in results if r.line not in saved] if saved else list(results)
        if new:
            connection = await session.connection()
            await connection.exec_driver_sql(
                _SQLITE_INSERT_RESULTS,
                [(batch_id, r.line, r.is_error, r.data) for r in new],
            )
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
                last_line_finished_at=case(
                    (BatchRow.last_line_finished_at > now, BatchRow.last_line_finished_at),
                    else_=now,
                ),
            )
            .execution_options(synchronize_session=False)
        )
    return new


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
    session: AsyncSession, batch_id: str, page_size: int = 5000
) -> AsyncIterator[Sequence[tuple[int, bool, str]]]:
    """Saved results ``(line, is_error, data)`` in input order, a page at a time.

    Bounded memory: one page of ``page_size`` rows at a time, found by keyset (line
    after the last page's). A Core select: no ORM row processing per result.
    """
    table = ResultRow.__table__.c
    query = select(table.line, table.is_error, table.data).order_by(table.line).limit(page_size)
    last = -1
    while True:
        page = (
            (await session.execute(query.where(table.batch_id == batch_id, table.line > last)))
            .tuples()
            .all()
        )
        if not page:
            return
        yield page
        last = page[-1][0]


# PostgreSQL joins a page of output lines itself: two rows per page (output, errors)
# instead of one per result.
_PG_RESULT_PAGE = text(
    "SELECT is_error, string_agg(data, E'\\n' ORDER BY line), max(line) FROM ("
    "SELECT line, is_error, data FROM results WHERE batch_id = :batch_id AND line > :after "
    "ORDER BY line LIMIT :limit) AS page GROUP BY is_error"
)


async def stream_result_text(
    session: AsyncSession, batch_id: str, page_size: int = 5000
) -> AsyncIterator[dict[bool, str]]:
    """Saved results in input order as text, a page at a time: ``{is_error: lines}``.

    Each value is the page's output (or error) lines joined by newlines, without a
    trailing one. On PostgreSQL the database joins them; elsewhere ``stream_results``.
    """
    if session.get_bind().dialect.name != "postgresql":
        async for rows in stream_results(session, batch_id, page_size):
            texts: dict[bool, list[str]] = {False: [], True: []}
            for _line, is_error, data in rows:
                texts[bool(is_error)].append(data)
            yield {is_error: "\n".join(lines) for is_error, lines in texts.items() if lines}
        return
    last = -1
    while True:
        params = {"batch_id": batch_id, "after": last, "limit": page_size}
        groups = (await session.execute(_PG_RESULT_PAGE, params)).tuples().all()
        if not groups:
            return
        yield {bool(is_error): joined for is_error, joined, _ in groups}
        last = max(int(line) for _, _, line in groups)


async def delete_results(session: AsyncSession, batch_id: str) -> None:
    await session.execute(delete(ResultRow).where(ResultRow.batch_id == batch_id))


async def finished_batches_with_results(session: AsyncSession, limit: int = 100) -> Sequence[str]:
    """Finished batches whose saved results were not deleted yet (a crash right after)."""
    has_results = select(ResultRow.line).where(ResultRow.batch_id == BatchRow.id).exists()
    query = select(BatchRow.id).where(BatchRow.status.in_(TERMINAL), has_results).limit(limit)
    return (await session.scalars(query)).all()


# ---------------------------------------------------------------- finalization

IN_BATCH = 500  # ids per ``IN (...)``: well under SQLite's and asyncpg's parameter limits


def _ready_to_finalize(now: float) -> Any:
    """Every chunk done (no stop requested), or stopping with no live chunk lease left."""
    undone = (
        select(ChunkRow.id)
        .where(ChunkRow.batch_id == BatchRow.id, ChunkRow.status != ChunkStatus.DONE)
        .exists()
    )
    live = (
        select(ChunkRow.id)
        .where(
            ChunkRow.batch_id == BatchRow.id,
            ChunkRow.status == ChunkStatus.RUNNING,
            ChunkRow.lease_until >= now,
        )
        .exists()
    )
    return or_(
        and_(
            BatchRow.stop_reason.is_(None),
            BatchRow.status.in_((BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)),
            ~undone,
        ),
        and_(BatchRow.stop_reason.is_not(None), ~live),
    )


def _finalize_lease_free(now: float, owner: str | None = None) -> Any:
    free = or_(BatchRow.finalize_lease_until.is_(None), BatchRow.finalize_lease_until < now)
    return free if owner is None else or_(free, BatchRow.finalize_owner == owner)


async def claim_finalization(
    session: AsyncSession, batch_id: str, *, owner: str, now: float, lease: float
) -> BatchRow | None:
    """Take the right to write a batch's output files: one guarded ``UPDATE``.

    Succeeds only if the batch is active, ready (see ``_ready_to_finalize``) and nobody
    else holds a live finalization lease (``owner`` may take its own lease again).
    ``in_progress`` moves to ``finalizing``; a stopping batch keeps its status until
    ``finish_batch``.
    """
    await lock_batch(session, batch_id)
    to_finalizing = BatchRow.status == BatchStatus.IN_PROGRESS
    result = await session.execute(
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            BatchRow.status.in_(ACTIVE),
            _finalize_lease_free(now, owner),
            _ready_to_finalize(now),
        )
        .values(
            finalize_owner=owner,
            finalize_lease_until=now + lease,
            status=case(
                (and_(to_finalizing, BatchRow.stop_reason.is_(None)), BatchStatus.FINALIZING),
                else_=BatchRow.status,
            ),
            finalizing_at=case(
                (and_(to_finalizing, BatchRow.stop_reason.is_(None)), int(now)),
                else_=BatchRow.finalizing_at,
            ),
        )
        .returning(BatchRow)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return result.scalars().first()


def _our_finalization(batch_id: str, owner: str, **values: Any) -> Any:
    """Set ``values`` on the batch while ``owner`` holds its finalization lease."""
    return (
        update(BatchRow)
        .where(
            BatchRow.id == batch_id,
            BatchRow.finalize_owner == owner,
            BatchRow.status.in_(ACTIVE),
        )
        .values(**values)
    )


async def renew_finalization(
    session: AsyncSession, batch_id: str, owner: str, until: float
) -> bool:
    """Extend our finalization lease; False if we lost it or the batch is finished."""
    result = await session.execute(_our_finalization(batch_id, owner, finalize_lease_until=until))
    return _rowcount(result) == 1


async def put_off_finalization(
    session: AsyncSession,
    batch_id: str,
    *,
    owner: str,
    errors: list[dict[str, Any]],
    until: float,
) -> bool:
    """Record why our finalization attempt failed (``errors``) and keep our lease until
    ``until``, so nobody retries before then; False if we no longer hold it."""
    result = await session.execute(
        _our_finalization(batch_id, owner, errors=errors, finalize_lease_until=until)
    )
    return _rowcount(result) == 1


async def finish_batch(
    session: AsyncSession,
    batch_id: str,
    *,
    owner: str,
    target: BatchStatus,
    files: Sequence[FileRow],
    output_file_id: str | None,
    error_file_id: str | None,
    extra_failed: int,
    now: int,
    deliveries: Sequence[DeliveryRow] = (),
) -> bool:
    """The final status, atomically: only if ``owner`` still holds the finalization lease.

    The output file rows and the final event's outbox rows (``deliveries``) are added in
    the same transaction; on False nothing was written.
    """
    await lock_batch(session, batch_id)
    values: dict[str, Any] = {
        # A batch that reaches finalization has no validation errors (those fail it at
        # once): ``errors`` can only hold why an earlier attempt failed, resolved now.
        "errors": None,
        "output_file_id": output_file_id,
        "error_file_id": error_file_id,
        "failed": BatchRow.failed + extra_failed,
        "finalize_owner": None,
        "finalize_lease_until": None,
        f"{target.value}_at": now,
    }
    if target is BatchStatus.COMPLETED:
        values["finalizing_at"] = func.coalesce(BatchRow.finalizing_at, now)
    moved = await _move_batch(
        session,
        batch_id,
        target,
        BatchRow.finalize_owner == owner,
        BatchRow.stop_reason.is_(None)
        if target is BatchStatus.COMPLETED
        else BatchRow.stop_reason == _STOP_FOR[target],
        **values,
    )
    if moved:
        session.add_all([*files, *deliveries])
        await session.flush()
    return moved


_STOP_FOR = {BatchStatus.CANCELLED: StopReason.CANCEL, BatchStatus.EXPIRED: StopReason.EXPIRE}


async def finalize_leases(
    session: AsyncSession, batch_ids: Collection[str]
) -> dict[str, tuple[str, float | None]]:
    """(status, finalization lease end) of each of ``batch_ids`` that exists."""
    out: dict[str, tuple[str, float | None]] = {}
    ids = list(batch_ids)
    for start in range(0, len(ids), IN_BATCH):
        query = select(BatchRow.id, BatchRow.status, BatchRow.finalize_lease_until).where(
            BatchRow.id.in_(ids[start : start + IN_BATCH])
        )
        for batch_id, status, until in await session.execute(query):
            out[batch_id] = (status, until)
    return out


async def referenced_keys(session: AsyncSession, keys: Collection[str]) -> set[str]:
    """Those of the storage ``keys`` that a file row points at."""
    out: set[str] = set()
    wanted = list(keys)
    for start in range(0, len(wanted), IN_BATCH):
        query = select(FileRow.storage_key).where(
            FileRow.storage_key.in_(wanted[start : start + IN_BATCH])
        )
        out.update(await session.scalars(query))
    return out


async def finalization_candidates(session: AsyncSession, now: float) -> Sequence[str]:
    """Batches ready for output assembly whose finalization lease is free."""
    query = select(BatchRow.id).where(
        BatchRow.status.in_(ACTIVE), _finalize_lease_free(now), _ready_to_finalize(now)
    )
    return (await session.scalars(query)).all()
