"""Every batch, chunk and delivery transition, one named function each (the tables are in
``states``; uploads move in ``uploads``).

Each function runs one transaction on a write session. A move whose guarded statement
matched nothing (wrong status, lost race, lost lease) raises ``IllegalTransition``: the one
way a refused transition is reported. Nothing else in the code base changes a status:
route handlers, the worker, the finalizer, housekeeping and the delivery dispatcher all
come through here.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from vllm_batch.batches.states import (
    FINAL_STATUS,
    BatchStatus,
    ChunkStatus,
    DeliveryStatus,
    IllegalTransition,
    StopReason,
)
from vllm_batch.batches.store import outbox, queries
from vllm_batch.batches.store.rows import BatchRow, ChunkRow, DeliveryRow, FileRow
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.observability import metrics
from vllm_batch.pipeline.input import BatchPlan
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.protocol.ids import new_id, now

__all__ = [
    "BatchSpec",
    "IllegalTransition",
    "InputFileGone",
    "InputFileNotForBatch",
    "NoSuchBatch",
    "cancel",
    "claim_chunk",
    "claim_deliveries",
    "claim_finalization",
    "create",
    "expire_overdue",
    "finish",
    "finish_chunk",
    "first_line_started",
    "queue_or_fail",
    "record_delivery",
    "release_chunk",
    "release_owner",
    "renew_finalization",
    "save",
]


class InputFileGone(LookupError):
    """The batch's input file does not exist (any more), or the caller may not see it."""


class NoSuchBatch(LookupError):
    """The batch does not exist."""


class InputFileNotForBatch(ValueError):
    """The batch's input file was not uploaded with purpose ``batch``."""

    def __init__(self, file_id: str, purpose: str) -> None:
        super().__init__(file_id, purpose)
        self.file_id, self.purpose = file_id, purpose


@dataclass(frozen=True)
class BatchSpec:
    """A checked batch creation request."""

    endpoint: str
    input_file_id: str
    completion_window: str
    window_seconds: int
    metadata: dict[str, str] | None
    priority: int
    output_expires_after: int | None
    owner: str | None


async def create(ctx: StoreContext, spec: BatchSpec, *, scope: str | None = None) -> BatchRow:
    """→ ``validating``, in one session (a route holds no other connection meanwhile).

    Raises ``InputFileGone`` if the input file does not exist or belongs to another owner
    than ``scope`` (None: any owner), ``InputFileNotForBatch`` if its purpose is not batch.
    """
    async with ctx.sessions() as session, session.begin():
        input_file = await queries.get_file(session, spec.input_file_id, owner=scope)
        if input_file is None:
            raise InputFileGone(spec.input_file_id)
        if input_file.purpose != "batch":
            raise InputFileNotForBatch(input_file.id, input_file.purpose)
        created = now()
        row = BatchRow(
            id=new_id("batch_"),
            endpoint=spec.endpoint,
            input_file_id=spec.input_file_id,
            completion_window=spec.completion_window,
            status=BatchStatus.VALIDATING,
            metadata_=spec.metadata,
            created_at=created,
            expires_at=created + spec.window_seconds,
            total=0,
            completed=0,
            failed=0,
            input_tokens=0,
            cached_tokens=0,
            output_tokens=0,
            reasoning_tokens=0,
            priority=spec.priority,
            output_expires_after=spec.output_expires_after,
            owner=spec.owner,
        )
        await queries.insert_batch(session, row)
    return row


async def queue_or_fail(ctx: StoreContext, batch_id: str, plan: BatchPlan) -> BatchStatus:
    """``validating`` → ``in_progress`` with chunks queued, or → ``failed`` with errors;
    ``IllegalTransition`` if the batch moved on meanwhile (say, it was cancelled).

    A failed batch's webhook deliveries commit with the status.
    """
    async with ctx.sessions() as session, session.begin():
        if plan.errors or plan.model is None:
            row = await queries.get_batch(session, batch_id)
            stamp = now()
            deliveries = ctx.deliveries.rows(
                batch_id, row.metadata_ if row else None, BatchStatus.FAILED, stamp
            )
            moved = await queries.fail_validation(session, batch_id, plan.errors, stamp, deliveries)
            target = BatchStatus.FAILED
        else:
            moved = await queries.start_batch(
                session, batch_id, model=plan.model, total=plan.total, chunks=plan.chunks, now=now()
            )
            target = BatchStatus.IN_PROGRESS
    if not moved:
        raise IllegalTransition(f"batch {batch_id} is no longer validating")
    return target


async def cancel(ctx: StoreContext, batch_id: str) -> BatchRow:
    """``validating``/``in_progress`` → ``cancelling``; ``NoSuchBatch`` if there is none.

    Cancelling an already cancelling or cancelled batch is a no-op; anything else raises
    ``IllegalTransition``.
    """
    async with ctx.sessions() as session, session.begin():
        row = await queries.lock_batch(session, batch_id)
        if row is None:
            raise NoSuchBatch(batch_id)
        stopping = await queries.request_stop(session, batch_id, StopReason.CANCEL, now())
        if not stopping and row.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            raise IllegalTransition(
                f"Cannot cancel batch {batch_id}: its status is '{row.status}'."
            )
    async with ctx.read_sessions() as session:
        found = await queries.get_batch(session, batch_id)
    if found is None:
        raise NoSuchBatch(batch_id)
    return found


async def expire_overdue(ctx: StoreContext) -> list[str]:
    """Running batches past their completion window get ``stop_reason = expire``."""
    async with ctx.sessions() as session, session.begin():
        stamp = now()
        overdue = await queries.overdue_batches(session, stamp)
        return [
            batch_id
            for batch_id in overdue
            if await queries.request_stop(session, batch_id, StopReason.EXPIRE, stamp)
        ]


async def claim_chunk(
    ctx: StoreContext,
    owner: str,
    models: Sequence[str],
    *,
    seconds_per_line: float = 0.0,
    exclude_batches: Collection[str] = (),
    exclude_chunks: Collection[str] = (),
) -> ChunkRow | None:
    """``queued`` (or ``running`` with an expired lease) → ``running`` under our lease.

    Which chunk: see ``queries.claim_chunk`` (deadline risk, priority-weighted interleaving,
    earliest deadline); ``seconds_per_line`` is the claimer's recent pace. A worker passes
    the chunks it holds as ``exclude_chunks``: after a database outage their leases may have
    expired, and it must renew them, not take them again from itself.
    """
    order = queries.ClaimOrder(
        seconds_per_line=seconds_per_line, deadline_margin=ctx.settings.deadline_margin
    )
    async with ctx.sessions() as session, session.begin():
        claim = await queries.claim_chunk(
            session,
            owner=owner,
            models=models,
            now=time.time(),
            lease=ctx.settings.lease_seconds,
            order=order,
            exclude_batches=exclude_batches,
            exclude_chunks=exclude_chunks,
        )
    if claim is None:
        return None
    metrics.chunk_claimed(claim.chunk.model, lease_expired=claim.lease_expired)
    return claim.chunk


async def starved_models(ctx: StoreContext, models: Sequence[str]) -> list[str]:
    """Models whose work has waited past ``model_max_wait`` with nothing running (a read)."""
    async with ctx.read_sessions() as session:
        return await queries.starved_models(
            session, models=models, now=time.time(), max_wait=ctx.settings.model_max_wait
        )


async def save(
    ctx: StoreContext, chunk: ChunkRow, owner: str, results: Sequence[LineResult]
) -> queries.SaveOutcome:
    """Save finished lines and renew the lease, only while the chunk is still ours
    (``IllegalTransition``: the lease was lost, or the batch is finalizing or finished)."""
    async with ctx.sessions() as session, session.begin():
        stamp = time.time()
        outcome = await queries.save_chunk_results(
            session,
            batch_id=chunk.batch_id,
            chunk_id=chunk.id,
            owner=owner,
            results=results,
            lease_until=stamp + ctx.settings.lease_seconds,
            now=stamp,
        )
    if outcome is None:
        raise IllegalTransition(f"chunk {chunk.id} is no longer held by {owner}")
    return outcome


async def first_line_started(ctx: StoreContext, batch_id: str, at: float) -> None:
    """Stamp the batch's timeline (not a transition): a line of it went to the engine at
    ``at``. Only the earliest such time stays; a resumed chunk never moves it."""
    async with ctx.sessions() as session, session.begin():
        await queries.mark_first_line_started(session, batch_id, at)


async def finish_chunk(ctx: StoreContext, chunk: ChunkRow, owner: str) -> ChunkStatus:
    """``running`` → ``done`` if every line has a result; otherwise back to ``queued``.

    ``IllegalTransition`` if the chunk is no longer ours.
    """
    async with ctx.sessions() as session, session.begin():
        saved = await queries.count_done_lines(
            session, chunk.batch_id, chunk.start_line, chunk.end_line
        )
        if saved == chunk.end_line - chunk.start_line:
            target, moved = ChunkStatus.DONE, await queries.finish_chunk(session, chunk.id, owner)
        else:
            target, moved = (
                ChunkStatus.QUEUED,
                await queries.release_chunk(session, chunk.id, owner),
            )
    if not moved:
        raise IllegalTransition(f"chunk {chunk.id} is no longer held by {owner}")
    return target


async def release_chunk(
    ctx: StoreContext, chunk: ChunkRow, owner: str, *, engine_failure: bool = False
) -> None:
    """``running`` → ``queued``; ``engine_failure`` counts toward ``max_chunk_attempts``.

    ``IllegalTransition`` if the chunk is no longer ours.
    """
    async with ctx.sessions() as session, session.begin():
        moved = await queries.release_chunk(session, chunk.id, owner, engine_failure=engine_failure)
    if not moved:
        raise IllegalTransition(f"chunk {chunk.id} is no longer held by {owner}")


async def release_owner(ctx: StoreContext, owner: str) -> int:
    """Every chunk ``owner`` runs → ``queued``, and its finalization leases dropped: a worker
    known to be dead. Returns how many chunks went back to the queue."""
    async with ctx.sessions() as session, session.begin():
        return await queries.release_owner(session, owner)


async def claim_finalization(ctx: StoreContext, batch_id: str, lease: float) -> BatchRow:
    """Take the batch's finalization lease (``in_progress`` → ``finalizing``) if it is ready
    and nobody else holds it; ``IllegalTransition`` otherwise."""
    async with ctx.sessions() as session, session.begin():
        row = await queries.claim_finalization(
            session, batch_id, owner=ctx.instance_id, now=time.time(), lease=lease
        )
    if row is None:
        raise IllegalTransition(f"batch {batch_id} is not ready to finalize, or is taken")
    return row


async def renew_finalization(ctx: StoreContext, batch_id: str, lease: float) -> None:
    """Extend our finalization lease; ``IllegalTransition`` if we lost it."""
    async with ctx.sessions() as session, session.begin():
        held = await queries.renew_finalization(
            session, batch_id, ctx.instance_id, time.time() + lease
        )
    if not held:
        raise IllegalTransition(f"lost the finalization lease of batch {batch_id}")


async def finish(
    ctx: StoreContext,
    batch: BatchRow,
    *,
    files: Sequence[FileRow],
    output_file_id: str | None,
    error_file_id: str | None,
    extra_failed: int,
) -> BatchStatus:
    """→ ``completed``/``cancelled``/``expired``, atomically, while we hold the lease
    (``IllegalTransition`` if we lost it: nothing was written).

    The final event's deliveries (webhooks, result handlers) commit with the status.
    """
    reason = StopReason(batch.stop_reason) if batch.stop_reason else None
    target = FINAL_STATUS[reason]
    stamp = now()
    # Planned before the transaction: handlers' enabled() is user code.
    deliveries = ctx.deliveries.rows(batch.id, batch.metadata_, target, stamp)
    async with ctx.sessions() as session, session.begin():
        done = await queries.finish_batch(
            session,
            batch.id,
            owner=ctx.instance_id,
            target=target,
            files=files,
            output_file_id=output_file_id,
            error_file_id=error_file_id,
            extra_failed=extra_failed,
            now=stamp,
            deliveries=deliveries,
        )
    if not done:
        raise IllegalTransition(f"lost the finalization lease of batch {batch.id}")
    return target


# ---------------------------------------------------------------- deliveries


async def claim_deliveries(
    ctx: StoreContext,
    *,
    lease: float,
    limit: int,
    receivers: outbox.Limits,
    stuck: Sequence[str],
) -> tuple[int, Sequence[DeliveryRow]]:
    """``pending`` → ``failed`` for the due deliveries to the ``stuck`` receivers (breaker
    open) whose horizon passed, then lease up to ``limit`` due ones: (failed, leased)."""
    async with ctx.sessions() as session, session.begin():
        stamp = time.time()
        gave_up = await outbox.give_up_waiting(session, stuck, now=stamp)
        claimed: Sequence[DeliveryRow] = ()
        if limit > 0:
            claimed = await outbox.claim_due(
                session,
                owner=ctx.instance_id,
                now=stamp,
                lease=lease,
                limit=limit,
                receivers=receivers,
            )
    return gave_up, claimed


async def record_delivery(
    ctx: StoreContext,
    delivery: DeliveryRow,
    attempt: outbox.Attempt,
    *,
    next_attempt_at: float | None,
) -> DeliveryStatus:
    """One attempt of a delivery we lease: ``pending`` stays ``pending`` (a retry at
    ``next_attempt_at``) or → ``succeeded``/``failed``; ``IllegalTransition`` if we lost
    the lease (nothing recorded)."""
    async with ctx.sessions() as session, session.begin():
        status = await outbox.record_attempt(
            session, delivery, ctx.instance_id, attempt, next_attempt_at=next_attempt_at
        )
    if status is None:
        raise IllegalTransition(f"lost the lease of delivery {delivery.id}")
    return status
