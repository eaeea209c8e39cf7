"""The dashboard's history sampler wired to the store: what one sample reads.

``observability.history`` keeps the samples and does the arithmetic; this module only
turns the store's two read-only statements (``batches/store/history_reads.py``) into readings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from vllm_batch.batches.states import BatchStatus
from vllm_batch.batches.store import history_reads as history_queries
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.observability.history import BatchReading, History, sample_forever
from vllm_batch.protocol.ids import first_id_at

BATCH_ID_PREFIX = "batch_"
RUNNING = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


async def read_sample(
    store: StoreContext, created_since: float, live_ids: set[str]
) -> Sequence[BatchReading]:
    """One sample's readings, from one read-only session."""
    async with store.read_sessions() as session:
        batches = await history_queries.sampled_batches(
            session, created_from_id=first_id_at(BATCH_ID_PREFIX, created_since), also=live_ids
        )
        open_lines = await history_queries.open_lines_by_batch(session)
    readings = []
    for b in batches:
        queued, running = open_lines.get(b.id, (0, 0))
        readings.append(
            BatchReading(
                id=b.id,
                owner=b.owner,
                live=b.status in history_queries.LIVE,
                completed=b.completed,
                failed=b.failed,
                output_tokens=b.output_tokens,
                # What waits for a worker: a stopped batch's queued chunks never run.
                queued_lines=queued if b.status == BatchStatus.IN_PROGRESS else 0,
                running_lines=running if b.status in RUNNING else 0,
            )
        )
    return readings


async def run_history(history: History, store: StoreContext, shutdown: asyncio.Event) -> None:
    """Sample ``store`` into ``history`` until ``shutdown``."""

    async def read(created_since: float, live_ids: set[str]) -> Sequence[BatchReading]:
        return await read_sample(store, created_since, live_ids)

    await sample_forever(history, read, shutdown)
