"""Which chunk a worker claims next, on SQLite and PostgreSQL (no engine): batches
interleave weighted by priority, earliest deadline first among equals, batches at risk of
missing their deadline first; and which models are starved."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import create_validating_batch
from tests.unit.test_lifecycle import LINES, force, input_lines, plan, store
from vllm_batch import lifecycle
from vllm_batch.runtime import StoreContext

OWNER = "tests/ns/1/claims"


@pytest.fixture
async def ctx(database_url: str, tmp_path: Path) -> AsyncIterator[StoreContext]:
    async with store(database_url, tmp_path) as context:
        yield context


async def queued(ctx: StoreContext, model: str, **values: object) -> str:
    """A queued batch of ``LINES`` lines (3 chunks) for ``model``; ``values`` set on its row."""
    batch_id = await create_validating_batch(ctx, input_lines(), LINES)
    assert await lifecycle.queue_or_fail(ctx, batch_id, plan(model))
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
