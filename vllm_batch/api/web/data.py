"""``/v1/dashboard/...``: the JSON the dashboard needs beyond the OpenAI-shaped ``/v1`` API.

Mounted under ``/v1``, so the edge checks the API key before anything runs. Batches are
the caller's own (every batch for admin keys); worker identities and chunk lease owners
only for admin callers, which includes every caller when no key is configured. The
history (``/history``, ``/batches/{id}/history``) is this process's in-memory samples
(``observability/history.py``), scoped the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.auth import KeyRing, Principal
from vllm_batch.api.batch_routes import batch_object, load_batch
from vllm_batch.api.deps import CtxDep, PrincipalDep, ReadSessionDep
from vllm_batch.api.probes import check_worker
from vllm_batch.api.state import AppContext
from vllm_batch.api.web.first_errors import ErrorFileHeads, parse_error_line, validation_errors
from vllm_batch.batches.states import BatchStatus
from vllm_batch.batches.store import overview as dash_queries
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow
from vllm_batch.models.kinds import kind_serves
from vllm_batch.observability import timeline
from vllm_batch.observability.history import ALL, History
from vllm_batch.pipeline.input import SUPPORTED_ENDPOINTS
from vllm_batch.protocol.dashboard import (
    BatchHistory,
    BatchPhases,
    ChunkInfo,
    ChunkList,
    DashboardBatch,
    DashboardHistory,
    LineError,
    Overview,
    QueueEntry,
    RemoteWorker,
    Viewer,
)
from vllm_batch.protocol.page import ListPage

router = APIRouter(prefix="/dashboard", tags=["dashboard"])
TERMINAL = {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED}
RUNNING_LINES = {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING}
LIST_ERRORS, DETAIL_ERRORS = 3, 10


def error_heads(ctx: AppContext, request: Request) -> ErrorFileHeads:
    """This app's cache of error file heads (made on first use)."""
    heads: ErrorFileHeads | None = getattr(request.app.state, "error_heads", None)
    if heads is None or heads.storage is not ctx.storage:
        heads = request.app.state.error_heads = ErrorFileHeads(ctx.storage)
    return heads


async def with_errors(
    ctx: AppContext,
    request: Request,
    session: AsyncSession,
    principal: Principal,
    rows: list[BatchRow],
    limit: int,
) -> list[DashboardBatch]:
    """``rows`` as dashboard batches, each with its first ``limit`` errors."""
    running = [r.id for r in rows if r.failed and r.status not in TERMINAL]
    saved = await dash_queries.first_error_rows(session, running, limit)
    out = []
    for row in rows:
        errors: list[LineError] = validation_errors(row.errors, limit)
        if not errors and row.failed:
            errors = [parse_error_line(data, line) for line, data in saved.get(row.id, [])]
            if not errors and row.error_file_id:
                file = await queries.get_file(session, row.error_file_id)
                if file is not None:
                    heads = error_heads(ctx, request)
                    errors = await heads.get(file.id, file.storage_key, limit)
        batch = DashboardBatch(
            **batch_object(row).model_dump(),
            owner=row.owner if principal.admin else None,
            first_errors=errors,
            first_line_started_at=row.first_line_started_at,
            last_line_finished_at=row.last_line_finished_at,
            phases=phases_of(row),
        )
        out.append(batch)
    return out


@router.get("/batches", response_model=ListPage[DashboardBatch])
async def list_batches(
    ctx: CtxDep,
    request: Request,
    session: ReadSessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    after: str | None = None,
) -> ListPage[DashboardBatch]:
    """Like ``GET /v1/batches`` (newest first, yours only), with each batch's first errors."""
    rows = await queries.list_batches(session, limit=limit, after=after, owner=principal.scope)
    shown = list(rows[:limit])
    batches = await with_errors(ctx, request, session, principal, shown, LIST_ERRORS)
    return ListPage(
        data=batches,
        first_id=batches[0].id if batches else None,
        last_id=batches[-1].id if batches else None,
        has_more=len(rows) > limit,
    )


@router.get("/batches/{batch_id}", response_model=DashboardBatch)
async def retrieve_batch(
    ctx: CtxDep, request: Request, session: ReadSessionDep, principal: PrincipalDep, batch_id: str
) -> DashboardBatch:
    row = await load_batch(session, principal, batch_id)
    return (await with_errors(ctx, request, session, principal, [row], DETAIL_ERRORS))[0]


@router.get("/batches/{batch_id}/chunks", response_model=ChunkList)
async def batch_chunks(
    session: ReadSessionDep,
    principal: PrincipalDep,
    batch_id: str,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> ChunkList:
    """The batch's chunks in order; lease owners only for admin callers."""
    row = await load_batch(session, principal, batch_id)
    chunks = await dash_queries.batch_chunks(session, batch_id, limit)
    shown = chunks[:limit]
    saved = await dash_queries.saved_lines(session, shown)
    owners = principal.admin
    return ChunkList(
        batch_id=batch_id,
        has_more=len(chunks) > limit,
        owners_visible=owners,
        finalize_owner=row.finalize_owner if owners else None,
        data=[
            ChunkInfo(
                index=c.idx,
                model=c.model,
                start_line=c.start_line,
                end_line=c.end_line,
                lines=c.end_line - c.start_line,
                status=c.status,
                attempts=c.attempts,
                engine_failures=c.engine_failures,
                saved_lines=(
                    c.end_line - c.start_line if c.status == "done" else saved.get(c.id, 0)
                ),
                lease_owner=c.lease_owner if owners else None,
                lease_until=c.lease_until if owners else None,
            )
            for c in shown
        ],
    )


def served_endpoints(ctx: AppContext) -> list[str]:
    """The batch endpoints at least one served model supports, in the API's order."""
    kinds = ctx.settings.model_kinds.values()
    return [e for e in SUPPORTED_ENDPOINTS if any(kind_serves(kind, e) for kind in kinds)]


@router.get("/overview", response_model=Overview)
async def overview(
    ctx: CtxDep, request: Request, session: ReadSessionDep, principal: PrincipalDep
) -> Overview:
    """Batch counts (yours), the queue per model, and the workers holding leases."""
    keys: KeyRing = request.app.state.keys
    worker = check_worker(ctx)
    local = {**worker.state, **worker.details} if principal.admin else dict(worker.state)
    leases = await dash_queries.active_leases(session, time.time())
    status = ctx.worker_status()
    local_id = status.worker_id or None if status is not None else None
    per_owner: Counter[str] = Counter(owner for owner, _, _ in leases)
    remote = [
        RemoteWorker(
            id=owner,
            running_chunks=count,
            models=sorted({model for o, model, _ in leases if o == owner}),
            lease_until=max(until for o, _, until in leases if o == owner),
        )
        for owner, count in sorted(per_owner.items())
        if owner != local_id
    ]
    active = len(per_owner) + (local_id is not None and local_id not in per_owner)
    queue = await dash_queries.queue_by_model(session)
    return Overview(
        viewer=Viewer(
            name=principal.name if keys.enabled else None,
            admin=principal.admin,
            keys_required=keys.enabled,
        ),
        models=ctx.settings.served_model_names,
        endpoints=served_endpoints(ctx),
        batches=await queries.count_batches_by_status(session, owner=principal.scope),
        queue=[QueueEntry(**vars(q)) for q in queue],
        this_process=local,
        workers=remote if principal.admin else [],
        active_workers=active,
    )


def sampled(ctx: AppContext) -> History:
    """This process's history (an empty one before the lifespan started the sampler)."""
    return (
        ctx.history if ctx.history is not None else History(ctx.settings.dashboard_history_interval)
    )


@router.get("/history", response_model=DashboardHistory)
async def history(ctx: CtxDep, principal: PrincipalDep) -> DashboardHistory:
    """Lines/s, tokens/s, queued and running lines over the last hour (yours; all for admins)."""
    ring = sampled(ctx)
    series = ring.series(ALL if principal.admin else principal.name)
    return DashboardHistory(
        scope="all" if principal.admin else "own",
        interval=ring.interval,
        window=ring.window,
        **vars(series),
    )


def phases_of(row: BatchRow) -> BatchPhases:
    """The batch's timeline phases so far, to the millisecond."""
    ended = row.completed_at or row.failed_at or row.cancelled_at or row.expired_at
    spans = timeline.phases(
        row.created_at,
        row.in_progress_at,
        row.first_line_started_at,
        row.last_line_finished_at,
        ended,
    )
    return BatchPhases(**{name: round(seconds, 3) for name, seconds in spans.items()})


def batch_end(row: BatchRow) -> int | None:
    """When the batch stopped running lines (None while it may still run some)."""
    ends = (row.finalizing_at, row.cancelled_at, row.expired_at, row.failed_at, row.completed_at)
    return next((t for t in ends if t), None) if row.status not in RUNNING_LINES else None


@router.get("/batches/{batch_id}/history", response_model=BatchHistory)
async def batch_history(
    ctx: CtxDep, session: ReadSessionDep, principal: PrincipalDep, batch_id: str
) -> BatchHistory:
    """The batch's completed and failed lines over time, from this process's samples.

    The series starts at zero when the batch started; a batch this process never saw move
    gets two points from its timestamps (start and end, or now).
    """
    row = await load_batch(session, principal, batch_id)
    points = sampled(ctx).batch_points(row.id)
    was_sampled = bool(points)
    start = row.in_progress_at
    if (
        start is not None
        and (not points or points[0][0] > start)
        and (not points or points[0][1:] != (0, 0))
    ):
        points.insert(0, (float(start), 0, 0))
    if not was_sampled and start is not None:
        end = batch_end(row)
        points.append((float(end if end is not None else time.time()), row.completed, row.failed))
    return BatchHistory(
        batch_id=row.id,
        total=row.total,
        sampled=was_sampled,
        t=[round(t, 3) for t, _, _ in points],
        completed=[done for _, done, _ in points],
        failed=[bad for _, _, bad in points],
    )
