"""Which chunk a worker claims next, on SQLite and PostgreSQL (no engine): batches
interleave weighted by priority, earliest deadline first among equals, batches at risk of
missing their deadline first; and which models are starved."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.helpers import create_validating_batch
from tests.unit.test_lifecycle import LINES, force, input_lines, plan, store
from vllm_batch.batches import lifecycle
from vllm_batch.batches.policy import batch_order
from vllm_batch.batches.states import BatchStatus
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow, ChunkRow
from vllm_batch.batches.store_context import StoreContext

OWNER = "tests/ns/1/claims"


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path) -> AsyncIterator[StoreContext]:
    async with store(database_url, tmp_path) as context:
        yield context


async def queued(ctx: StoreContext, model: str, **values: object) -> str:
    """A queued batch of ``LINES`` lines (3 chunks) for ``model``; ``values`` set on its row."""
    batch_id = await create_validating_batch(ctx, input_lines(), LINES)
    assert await lifecycle.queue_or_fail(ctx, batch_id, plan(model)) == BatchStatus.IN_PROGRESS
    if values:
        await force(ctx, batch_id, **values)
    return batch_id


async def claims(ctx: StoreContext, model: str, count: int, **kwargs: object) -> list[str]:
    """The batch ids of the next ``count`` claims (each chunk stays running)."""
    taken = []
    for _ in range(count):
        chunk = await lifecycle.claim_chunk(ctx, OWNER, [model], **kwargs)  # type: ignore[arg-type]
        assert chunk is not None
        taken.append(chunk.batch_id)
    return taken


async def test_batches_interleave_instead_of_first_come_first_served(ctx: StoreContext) -> None:
    model = uuid.uuid4().hex
    big = await queued(ctx, model, created_at=int(time.time()) - 60)
    small = await queued(ctx, model)
    assert await claims(ctx, model, 4) == [big, small, big, small]


async def test_priority_weights_the_interleaving(ctx: StoreContext) -> None:
    model = uuid.uuid4().hex
    high = await queued(ctx, model, priority=2)  # three shares
    low = await queued(ctx, model)  # one share
    low2 = await queued(ctx, model)
    taken = await claims(ctx, model, 6)
    assert taken.count(high) == 3 and taken.count(low) + taken.count(low2) == 3
    assert taken[0] == high and taken.index(low) < taken.index(low2)  # oldest first on ties


async def test_earliest_deadline_first_among_equal_priorities(ctx: StoreContext) -> None:
    model = uuid.uuid4().hex
    now = int(time.time())
    standard = await queued(ctx, model, created_at=now - 600, expires_at=now - 600 + 86400)
    high_tier = await queued(ctx, model, expires_at=now + 3600)
    assert await claims(ctx, model, 2) == [high_tier, standard]
    # ...and then gets about 24 shares to the 24h batch's one.
    assert await claims(ctx, model, 2) == [high_tier, high_tier]


async def test_a_batch_at_risk_goes_before_higher_priorities(ctx: StoreContext) -> None:
    model = uuid.uuid4().hex
    now = int(time.time())
    await queued(ctx, model, priority=5)
    # 10 lines at 60 s each leave no slack before its deadline, 20 minutes away.
    risky = await queued(ctx, model, created_at=now - 2400, expires_at=now + 1200)
    assert await claims(ctx, model, 1, seconds_per_line=60.0) == [risky]
    # Without a pace, nothing looks at risk: the higher priority goes first.
    other = uuid.uuid4().hex
    high = await queued(ctx, other, priority=5)
    await queued(ctx, other, created_at=now - 2400, expires_at=now + 3000)
    assert await claims(ctx, other, 1) == [high]


async def test_excluded_batches_are_left_alone(ctx: StoreContext) -> None:
    model = uuid.uuid4().hex
    first = await queued(ctx, model)
    assert await claims(ctx, model, 1) == [first]
    assert await lifecycle.claim_chunk(ctx, OWNER, [model], exclude_batches={first}) is None
    second = await queued(ctx, model)
    assert await claims(ctx, model, 1, exclude_batches={first}) == [second]


async def test_starved_models(ctx: StoreContext) -> None:
    waiting, fresh, served = (uuid.uuid4().hex for _ in range(3))
    long_ago = int(time.time()) - 1000
    await queued(ctx, waiting, in_progress_at=long_ago)
    await queued(ctx, fresh)
    await queued(ctx, served, in_progress_at=long_ago)
    await claims(ctx, served, 1)  # one of its chunks runs: it is not starved
    starved = await lifecycle.starved_models(ctx, [waiting, fresh, served])
    assert starved == [waiting]
    assert await lifecycle.starved_models(ctx, []) == []


async def test_sql_order_terms_match_the_lanes_batch_order(ctx: StoreContext) -> None:
    """The claim's SQL (``queries.order_terms``) and a worker's lanes (``batch_order``)
    weigh, date and flag every kind of batch the same way."""
    model = uuid.uuid4().hex
    now = float(int(time.time()))
    cases = [  # priority, created offset, window (None: no expiry), finished lines
        (0, -60, 86400, 0),
        (3, -600, 3600, 10),
        (-2, -3000, 3600, 5),
        (1, -86000, 86400, 0),  # 400 s left: at risk, near the deadline factor's cap
        (0, -10, None, 0),
        (7, -7200, 3600, 29),  # expired window: negative slack, urgent
    ]
    ids = []
    for priority, offset, window, done in cases:
        created = int(now) + offset
        expires = None if window is None else created + window
        ids.append(
            await queued(
                ctx,
                model,
                priority=priority,
                created_at=created,
                expires_at=expires,
                completed=done,
            )
        )
    for spl, margin in ((0.0, 0.25), (2.5, 0.25), (40.0, 0.5)):
        terms = queries.order_terms(now, queries.ClaimOrder(spl, margin))
        query = select(
            BatchRow.id,
            BatchRow.priority,
            BatchRow.total,
            BatchRow.completed,
            BatchRow.failed,
            BatchRow.created_at,
            BatchRow.expires_at,
            terms.weight,
            terms.latest_start,
            terms.urgent,
        ).where(BatchRow.id.in_(ids))
        async with ctx.read_sessions() as session:
            rows = (await session.execute(query)).all()
        assert len(rows) == len(cases)
        urgent_seen = set()
        for row in rows:
            want = batch_order(
                priority=row.priority,
                remaining=row.total - row.completed - row.failed,
                created_at=row.created_at,
                expires_at=row.expires_at,
                now=now,
                seconds_per_line=spl,
                margin=margin,
            )
            weight, latest_start, urgent = row[-3:]
            assert float(weight) == pytest.approx(want.weight, rel=1e-9), row
            assert float(latest_start) == pytest.approx(want.latest_start, rel=1e-12), row
            assert bool(urgent) is want.urgent, row
            urgent_seen.add(want.urgent)
        assert urgent_seen == {True, False}  # the cases cover both sides of the margin


async def test_a_held_chunk_whose_lease_expired_is_not_taken_again_by_its_holder(
    ctx: StoreContext,
) -> None:
    """After a database outage longer than the lease, the holder must renew its chunks, not
    claim them from itself (that would lose their unsaved results)."""
    model = uuid.uuid4().hex
    await queued(ctx, model)
    held = await lifecycle.claim_chunk(ctx, OWNER, [model])
    assert held is not None
    async with ctx.sessions() as session, session.begin():
        await session.execute(
            update(ChunkRow).where(ChunkRow.id == held.id).values(lease_until=time.time() - 1)
        )
    other = await lifecycle.claim_chunk(ctx, OWNER, [model], exclude_chunks={held.id})
    assert other is not None and other.id != held.id
    # Anyone not holding it (another worker) may take the expired chunk.
    assert (await lifecycle.claim_chunk(ctx, "another-worker", [model])).id == held.id
