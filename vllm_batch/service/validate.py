"""Validate a new batch's input file and enqueue its chunks (or fail it with line errors)."""

from __future__ import annotations

import logging

import anyio

from vllm_batch import lifecycle
from vllm_batch.runtime import StoreContext
from vllm_batch.states import BatchStatus
from vllm_batch.store import queries
from vllm_batch.validation import BatchPlan, plan_batch

log = logging.getLogger(__name__)


async def validate_batch(ctx: StoreContext, batch_id: str) -> None:
    """``validating`` → ``in_progress`` with chunks queued, or → ``failed`` with ``errors``."""
    settings = ctx.settings
    async with ctx.read_sessions() as session:
        batch = await queries.get_batch(session, batch_id)
        if batch is None or batch.status != BatchStatus.VALIDATING:
            return
        input_file = await queries.get_file(session, batch.input_file_id)
    if input_file is None:
        plan = BatchPlan()
        plan.error(
            "file_not_found",
            f"The input file {batch.input_file_id} no longer exists.",
            param="input_file_id",
        )
    else:

        def scan() -> BatchPlan:
            with ctx.storage.open_read(input_file.storage_key) as handle:
                return plan_batch(
                    handle,
                    endpoint=batch.endpoint,
                    served_models=settings.served_model_names,
                    max_requests=settings.max_requests_per_batch,
                    chunk_size=settings.chunk_size,
                )

        plan = await anyio.to_thread.run_sync(scan)
    await lifecycle.queue_or_fail(ctx, batch_id, plan)
    if plan.errors or plan.model is None:
        log.info("batch %s failed validation: %s", batch_id, plan.errors[:3])
    else:
        log.info(
            "batch %s queued: %d requests in %d chunks for %s",
            batch_id,
            plan.total,
            len(plan.chunks),
            plan.model,
        )
    ctx.notifier.wake()


async def resume_validation(ctx: StoreContext) -> None:
    """Validate batches left in ``validating`` by a previous process."""
    async with ctx.read_sessions() as session:
        pending = await queries.batches_with_status(session, BatchStatus.VALIDATING)
    for batch_id in pending:
        await validate_batch(ctx, batch_id)
