"""Statements for the delivery outbox (webhooks and result handlers) and server secrets.

Callers own the transaction. Rows are added by the transaction that sets a batch's final
status (``queries.finish_batch`` / ``queries.fail_validation``); a dispatcher leases due
rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two
processes never run one delivery at the same time, and records each attempt under its lease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.store.models import DeliveryAttemptRow, DeliveryRow, ServerSecretRow

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"


def _free(now: float) -> ColumnElement[bool]:
    return or_(DeliveryRow.lease_until.is_(None), DeliveryRow.lease_until < now)


async def claim_due(
    session: AsyncSession, *, owner: str, now: float, lease: float, limit: int
) -> Sequence[DeliveryRow]:
    """Lease up to ``limit`` pending deliveries whose next attempt is due."""
    candidates = (
        select(DeliveryRow.id)
        .where(DeliveryRow.status == PENDING, DeliveryRow.next_attempt_at <= now, _free(now))
        .order_by(DeliveryRow.next_attempt_at, DeliveryRow.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list((await session.scalars(candidates)).all())
    if not ids:
        return []
    result = await session.execute(
        update(DeliveryRow)
        .where(DeliveryRow.id.in_(ids), DeliveryRow.status == PENDING, _free(now))
        .values(lease_owner=owner, lease_until=now + lease)
        .returning(DeliveryRow)
        .execution_options(synchronize_session=False)
    )
    return result.scalars().all()


async def renew_lease(session: AsyncSession, delivery_id: str, owner: str, until: float) -> bool:
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == delivery_id,
            DeliveryRow.lease_owner == owner,
            DeliveryRow.status == PENDING,
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
            DeliveryRow.status == PENDING,
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
) -> str | None:
    """Store one attempt and the delivery's new state; None if our lease was lost.

    ``next_attempt_at`` None means no retry: the delivery ends ``succeeded`` or ``failed``.
    """
    status = SUCCEEDED if attempt.ok else (PENDING if next_attempt_at is not None else FAILED)
    result = await session.execute(
        update(DeliveryRow)
        .where(
            DeliveryRow.id == delivery.id,
            DeliveryRow.lease_owner == owner,
            DeliveryRow.status == PENDING,
        )
        .values(
            status=status,
            attempts=DeliveryRow.attempts + 1,
            last_attempt_at=attempt.started_at,
            last_status_code=attempt.status_code,
            last_error=attempt.error,
            next_attempt_at=next_attempt_at if status == PENDING else None,
            finished_at=None if status == PENDING else attempt.finished_at,
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


async def counts(session: AsyncSession, owner: str | None = None) -> dict[str, int]:
    """Deliveries by status (``owner``: only batches that key created)."""
    from vllm_batch.store.models import BatchRow

    query = select(DeliveryRow.status, func.count()).group_by(DeliveryRow.status)
    if owner is not None:
        query = query.join(BatchRow, BatchRow.id == DeliveryRow.batch_id).where(
            BatchRow.owner == owner
        )
    found = {str(status): int(n) for status, n in (await session.execute(query)).all()}
    return {status: found.get(status, 0) for status in (PENDING, SUCCEEDED, FAILED)}


async def next_due(session: AsyncSession) -> float | None:
    query = select(func.min(DeliveryRow.next_attempt_at)).where(and_(DeliveryRow.status == PENDING))
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
