"""Statements for the delivery outbox (webhooks and result handlers) and server secrets.

Callers own the transaction. Rows are added by the transaction that sets a batch's final
status (``queries.finish_batch`` / ``queries.fail_validation``); a dispatcher leases due
rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two
processes never run one delivery at the same time, and records each attempt under its lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, case, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.batches.states import DeliveryKind, DeliveryStatus, delivery_sources
from vllm_batch.batches.store.rows import DeliveryAttemptRow, DeliveryRow, ServerSecretRow

WEBHOOK_PREFIX, HANDLER_PREFIX = "webhook:", "handler:"
GAVE_UP_WHILE_OPEN = (
    "gave up: the retry horizon passed while this receiver's circuit breaker was open "
    "(it failed VLLM_BATCH_DELIVERY_BREAKER_FAILURES times in a row)"
)


def receiver_of(kind: str, target: str) -> str:
    """The receiver key of a delivery: ``webhook:<host>`` or ``handler:<name>``."""
    if kind != DeliveryKind.WEBHOOK:
        return HANDLER_PREFIX + target
    try:
        host = urlsplit(target).hostname or ""
    except ValueError:
        host = ""
    return WEBHOOK_PREFIX + host.lower().rstrip(".")


@dataclass(frozen=True)
class Limits:
    """What a claim may take: receivers to skip, and the room left on the busy ones."""

    blocked: frozenset[str]
    room: dict[str, int]
    """Receivers with attempts in flight (or probing): how many more each may start."""
    per_receiver: int
    """Room of every receiver not named in ``room`` or ``blocked``."""


def _free(now: float) -> ColumnElement[bool]:
    return or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now)


async def claim_due(
    session: AsyncSession,
    *,
    owner: str,
    now: float,
    lease: float,
    limit: int,
    receivers: Limits | None = None,
) -> Sequence[DeliveryRow]:
    """Lease up to ``limit`` pending deliveries whose next attempt is due, oldest first.

    ``receivers`` (see ``deliveries.receivers``): skip the blocked receivers and take at most
    each receiver's room, so one receiver's backlog never fills the claim.
    """
    due = [
        DeliveryRow.status == DeliveryStatus.PENDING,
        DeliveryRow.next_attempt_at <= now,
        _free(now),
    ]
    if receivers is None:
        chosen = (
            select(DeliveryRow.id)
            .where(*due)
            .order_by(DeliveryRow.next_attempt_at, DeliveryRow.id)
            .limit(limit)
        )
    else:
        if receivers.blocked:
            due.append(DeliveryRow.receiver.not_in(sorted(receivers.blocked)))
        order = (DeliveryRow.next_attempt_at, DeliveryRow.id)
        ranked = (
            select(
                DeliveryRow.id,
                DeliveryRow.receiver,
                DeliveryRow.next_attempt_at,
                func.row_number()
                .over(partition_by=DeliveryRow.receiver, order_by=order)
                .label("rank"),
            )
            .where(*due)
            .subquery()
        )
        room: ColumnElement[int] = (
            case(receivers.room, value=ranked.c.receiver, else_=receivers.per_receiver)
            if receivers.room
            else literal(receivers.per_receiver)
        )
        chosen = (
            select(ranked.c.id)
            .where(ranked.c.rank <= room)
            .order_by(ranked.c.next_attempt_at, ranked.c.id)
            .limit(limit)
        )
    # The lock (PostgreSQL) goes on an outer select: window functions cannot take one.
    candidates = select(DeliveryRow.id).where(DeliveryRow.id.in_(chosen))
    ids = list((await session.scalars(candidates.with_for_update(skip_locked=True))).all())
    if not ids:
        return []
    result = await session.execute(
        update(DeliveryRow)
        .where(DeliveryRow.id.in_(ids), DeliveryRow.status == DeliveryStatus.PENDING, _free(now))
        .values(lease_owner=owner, lease_until=now + lease)
        .returning(DeliveryRow)
        .execution_options(synchronize_session=False)
    )
    return result.scalars().all()


async def defer_receiver(session: AsyncSession, receiver: str, *, until: float, now: float) -> int:
    """Move ``receiver``'s free pending deliveries due before ``until`` to ``until`` (or to
    their ``give_up_at``, if sooner). Used while its circuit breaker is open: no attempt is
    counted, and the retry horizon stays where it was."""
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.receiver == receiver,
            DeliveryRow.status == DeliveryStatus.PENDING,
            DeliveryRow.next_attempt_at < until,
            _free(now),
        )
        .values(
            next_attempt_at=case(
                (DeliveryRow.give_up_at < until, DeliveryRow.give_up_at), else_=until
            )
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def give_up_waiting(session: AsyncSession, receivers: Sequence[str], *, now: float) -> int:
    """Fail the free pending deliveries to ``receivers`` (whose breakers are open) that
    reached their ``give_up_at``: they cannot get another attempt within their horizon."""
    if not receivers:
        return 0
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.receiver.in_(receivers),
            DeliveryRow.status.in_(delivery_sources(DeliveryStatus.FAILED)),
            DeliveryRow.give_up_at <= now,
            _free(now),
        )
        .values(
            status=DeliveryStatus.FAILED,
            next_attempt_at=None,
            finished_at=now,
            last_error=GAVE_UP_WHILE_OPEN,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


async def renew_lease(session: AsyncSession, delivery_id: str, owner: str, until: float) -> bool:
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == delivery_id,
            DeliveryRow.lease_owner == owner,
            DeliveryRow.status == DeliveryStatus.PENDING,
        )
        .values(lease_until=until)
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


async def release(session: AsyncSession, ids: Sequence[str], owner: str) -> int:
    """Drop ``owner``'s leases on ``ids``: those deliveries are due again at once."""
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id.in_(ids),
            DeliveryRow.lease_owner == owner,
            DeliveryRow.status == DeliveryStatus.PENDING,
        )
        .values(lease_owner=None, lease_until=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True)
class Attempt:
    started_at: float
    finished_at: float
    ok: bool
    status_code: int | None
    error: str | None


async def record_attempt(
    session: AsyncSession,
    delivery: DeliveryRow,
    owner: str,
    attempt: Attempt,
    *,
    next_attempt_at: float | None,
) -> DeliveryStatus | None:
    """Store one attempt and the delivery's new state; None if our lease was lost.

    ``next_attempt_at`` None means no retry: the delivery ends ``succeeded`` or ``failed``.
    """
    status = (
        DeliveryStatus.SUCCEEDED
        if attempt.ok
        else DeliveryStatus.PENDING
        if next_attempt_at is not None
        else DeliveryStatus.FAILED
    )
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == delivery.id,
            DeliveryRow.lease_owner == owner,
            DeliveryRow.status.in_(delivery_sources(status)),
        )
        .values(
            status=status,
            attempts=DeliveryRow.attempts + 1,
            last_attempt_at=attempt.started_at,
            last_status_code=attempt.status_code,
            last_error=attempt.error,
            next_attempt_at=next_attempt_at if status == DeliveryStatus.PENDING else None,
            finished_at=None if status == DeliveryStatus.PENDING else attempt.finished_at,
            lease_owner=None,
            lease_until=None,
        )
        .returning(DeliveryRow.attempts)
    )
    number = result.scalar_one_or_none()
    if number is None:
        return None
    session.add(
        DeliveryAttemptRow(
            delivery_id=delivery.id,
            number=number,
            started_at=attempt.started_at,
            finished_at=attempt.finished_at,
            ok=attempt.ok,
            status_code=attempt.status_code,
            error=attempt.error,
            owner=owner,
        )
    )
    await session.flush()
    return status


async def for_batch(session: AsyncSession, batch_id: str) -> Sequence[DeliveryRow]:
    query = (
        select(DeliveryRow)
        .where(DeliveryRow.batch_id == batch_id)
        .order_by(DeliveryRow.created_at, DeliveryRow.id)
    )
    return (await session.scalars(query)).all()


async def attempts_of(session: AsyncSession, delivery_id: str) -> Sequence[DeliveryAttemptRow]:
    query = (
        select(DeliveryAttemptRow)
        .where(DeliveryAttemptRow.delivery_id == delivery_id)
        .order_by(DeliveryAttemptRow.number)
    )
    return (await session.scalars(query)).all()


async def counts(session: AsyncSession, owner: str | None = None) -> dict[DeliveryStatus, int]:
    """Deliveries by status (``owner``: only batches that key created)."""
    from vllm_batch.batches.store.rows import BatchRow

    query = select(DeliveryRow.status, func.count()).group_by(DeliveryRow.status)
    if owner is not None:
        query = query.join(BatchRow, BatchRow.id == DeliveryRow.batch_id).where(
            BatchRow.owner == owner
        )
    found = {status: int(n) for status, n in (await session.execute(query)).all()}
    return {status: found.get(status, 0) for status in DeliveryStatus}


async def next_due(session: AsyncSession) -> float | None:
    query = select(func.min(DeliveryRow.next_attempt_at)).where(
        DeliveryRow.status == DeliveryStatus.PENDING
    )
    value = (await session.execute(query)).scalar_one_or_none()
    return float(value) if value is not None else None


async def get_or_create_secret(session: AsyncSession, name: str, fresh: str, now: int) -> str:
    """The stored secret ``name``; stores ``fresh`` first if there is none (race-safe)."""
    dialect = session.get_bind().dialect.name
    insert_fn = pg_insert if dialect == "postgresql" else sqlite_insert
    await session.execute(
        insert_fn(ServerSecretRow)
        .values(name=name, value=fresh, created_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    return str(
        (
            await session.execute(select(ServerSecretRow.value).where(ServerSecretRow.name == name))
        ).scalar_one()
    )
