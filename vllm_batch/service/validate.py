"""Validate a new batch's input file and enqueue its chunks (or fail it with line errors)."""

from __future__ import annotations

import logging

import anyio

from vllm_batch.protocol.ids import now
from vllm_batch.store import queries
from vllm_batch.validation import BatchPlan, plan_batch
from vllm_batch.worker.context import StoreContext

log = logging.getLogger(__name__)


async def validate_batch(ctx: StoreContext, batch_id: str) -> None:
    """``validating`` → ``in_progress`` with chunks queued, or → ``failed`` with ``errors``."""
    settings = ctx.settings
    async with ctx.sessions() as session:
        batch = await queries.get_batch(session, batch_id)
        if batch is None or batch.status != "validating":
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
    async with ctx.sessions() as session, session.begin():
        if plan.errors or plan.model is None:
            await queries.fail_validation(session, batch_id, plan.errors, now())
            log.info("batch %s failed validation: %s", batch_id, plan.errors[:3])
        else:
            await queries.start_batch(
                session, batch_id, model=plan.model, total=plan.total, chunks=plan.chunks, now=now()
            )
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
    async with ctx.sessions() as session:
        pending = await queries.batches_with_status(session, "validating")
    for batch_id in pending:
        await validate_batch(ctx, batch_id)
