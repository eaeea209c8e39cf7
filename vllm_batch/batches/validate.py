"""Validate a new batch's input file and enqueue its chunks (or fail it with line errors).

``validate_batch`` is idempotent (its writes are conditional on status ``validating``), so
a batch left in ``validating`` by a crash, a storage error or a database outage is simply
validated again by ``ValidationSweeper``, which every server runs in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio

from vllm_batch.batches import lifecycle
from vllm_batch.batches.states import BatchStatus, IllegalTransition
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.db_retry import is_db_outage
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.config import Settings
from vllm_batch.models.adapters import adapter_bases
from vllm_batch.pipeline.input import BatchPlan, plan_batch

log = logging.getLogger(__name__)


async def validate_batch(
    ctx: StoreContext, batch_id: str, in_flight: set[str] | None = None
) -> None:
    """``validating`` → ``in_progress`` with chunks queued, or → ``failed`` with ``errors``.

    ``in_flight`` (optional) holds the batch id while it is being validated here, so the
    sweeper leaves it alone.
    """
    if in_flight is None:
        await _validate(ctx, batch_id)
        return
    if batch_id in in_flight:
        return
    in_flight.add(batch_id)
    try:
        await _validate(ctx, batch_id)
    finally:
        in_flight.discard(batch_id)


async def _validate(ctx: StoreContext, batch_id: str) -> None:
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
        served, source = await served_models(settings)

        def scan() -> BatchPlan:
            with ctx.storage.open_read(input_file.storage_key) as handle:
                return plan_batch(
                    handle,
                    endpoint=batch.endpoint,
                    served_models=served,
                    model_kinds=settings.model_kinds,
                    max_requests=settings.max_requests_per_batch,
                    chunk_size=settings.chunk_size,
                    adapters=adapter_bases(settings.lora_specs),
                    model_source=source,
                )

        plan = await anyio.to_thread.run_sync(scan)
    try:
        await lifecycle.queue_or_fail(ctx, batch_id, plan)
    except IllegalTransition:
        log.info("batch %s left validating meanwhile", batch_id, extra={"batch_id": batch_id})
        return
    if plan.errors or plan.model is None:
        # Codes and line numbers only: messages quote input fields, which stay out of logs.
        first = ", ".join(f"{e['code']} (line {e['line']})" for e in plan.errors[:3])
        log.info("batch %s failed validation: %s", batch_id, first, extra={"batch_id": batch_id})
    else:
        log.info(
            "batch %s queued: %d requests in %d chunks for %s",
            batch_id,
            plan.total,
            len(plan.chunks),
            plan.model,
            extra={"batch_id": batch_id},
        )
    ctx.notifier.wake()


async def served_models(settings: Settings) -> tuple[list[str], str | None]:
    """The models a batch may use now, and where that list came from (None: configured).

    With the remote engine, a model counts only while some upstream's ``/v1/models`` lists
    it; when no upstream answers, ``UpstreamsUnreachable`` leaves the batch validating (the
    sweeper tries again), so an upstream restart never fails a batch.
    """
    if settings.engine != "openai":
        return settings.served_model_names, None
    from vllm_batch.engines.upstreams import upstream_served

    served = await upstream_served(
        settings.model_specs, settings.engine_urls, settings.engine_api_key
    )
    return served, f"by any upstream ({', '.join(settings.engine_urls)})"


SWEEP_SECONDS = 10.0
FIRST_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 300.0


class ValidationSweeper:
    """Re-validates batches stuck in ``validating`` that this process is not validating.

    The first sweep (at start) takes every such batch: a previous process left it. Later
    sweeps retry a batch whose validation failed here (storage or database error) with
    backoff, and any other once this sweeper has seen it waiting ``stale_after`` seconds
    (another process may still be validating a fresh one; validating twice is harmless).
    """

    def __init__(
        self,
        ctx: StoreContext,
        in_flight: set[str],
        *,
        interval: float = SWEEP_SECONDS,
        stale_after: float = 60.0,
    ) -> None:
        self.ctx = ctx
        self.in_flight = in_flight
        self.interval = interval
        self.stale_after = stale_after
        self._retry_at: dict[str, tuple[float, float]] = {}  # batch -> (when, last delay)
        self._first_seen: dict[str, float] = {}
        self._first = True

    async def run(self, shutdown: asyncio.Event) -> None:
        """Sweep every ``interval`` seconds until ``shutdown``; a failed sweep is logged."""
        while not shutdown.is_set():
            try:
                await self.sweep()
            except Exception as exc:
                if not is_db_outage(exc):
                    log.exception("validation sweep failed; retrying")
                else:  # expected during an outage: one line, not a traceback
                    log.warning("validation sweep: database unavailable (%s)", type(exc).__name__)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(shutdown.wait(), self.interval)

    async def sweep(self) -> int:
        """Validate the due batches; returns how many were attempted."""
        async with self.ctx.read_sessions() as session:
            pending = await queries.batches_with_status(session, BatchStatus.VALIDATING)
        first, self._first = self._first, False
        clock = time.monotonic()
        attempted = 0
        for batch_id in pending:
            seen = self._first_seen.setdefault(batch_id, clock)
            if batch_id in self.in_flight:
                continue
            retry = self._retry_at.get(batch_id)
            if retry is not None:
                if retry[0] > clock:
                    continue
            elif not first and clock - seen < self.stale_after:
                continue
            attempted += 1
            try:
                await validate_batch(self.ctx, batch_id, self.in_flight)
            except Exception as exc:
                delay = min(MAX_RETRY_SECONDS, retry[1] * 2) if retry else FIRST_RETRY_SECONDS
                self._retry_at[batch_id] = (time.monotonic() + delay, delay)
                log.warning(
                    "validating batch %s failed (%s: %s); retrying in %.0f s",
                    batch_id,
                    exc.__class__.__name__,
                    exc,
                    delay,
                )
            else:
                self._retry_at.pop(batch_id, None)
        known = set(pending)
        for table in (self._retry_at, self._first_seen):
            for batch_id in [b for b in table if b not in known]:
                del table[batch_id]
        return attempted
