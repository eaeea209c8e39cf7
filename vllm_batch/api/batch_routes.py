"""``/v1/batches``: create, list, retrieve, cancel, ``/results`` and ``/deliveries``."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.auth import Principal
from vllm_batch.api.deps import CtxDep, PrincipalDep, ReadSessionDep
from vllm_batch.api.errors import APIError, found, invalid, not_found
from vllm_batch.api.file_routes import page, stream_file
from vllm_batch.batches import lifecycle
from vllm_batch.batches.finalize import finalize_batch
from vllm_batch.batches.states import BatchStatus, DeliveryKind
from vllm_batch.batches.store import outbox, queries
from vllm_batch.batches.store.rows import BatchRow, DeliveryRow
from vllm_batch.batches.validate import validate_batch
from vllm_batch.config import Settings
from vllm_batch.deliveries.webhook import display_target
from vllm_batch.models.kinds import kind_serves
from vllm_batch.net.guard import AllowList, RefusedURL, check_url
from vllm_batch.pipeline.input import SUPPORTED_ENDPOINTS
from vllm_batch.protocol.batch import (
    Batch,
    BatchCreateRequest,
    BatchRequestCounts,
    BatchUsage,
    Errors,
    InputTokensDetails,
    OutputTokensDetails,
)
from vllm_batch.protocol.delivery import Delivery, DeliveryAttempt, DeliveryList
from vllm_batch.protocol.page import ListPage

router = APIRouter(tags=["batches"])
# ASCII digits only, bounded length (no huge ints), matched with fullmatch (no "24h\n").
WINDOW_PATTERN = re.compile(r"([0-9]{1,6})([smhd])")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 3600, 30 * 86400
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # batches.priority is a 32-bit Integer
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def batch_object(row: BatchRow) -> Batch:
    usage = None
    if row.status not in (BatchStatus.VALIDATING, BatchStatus.FAILED):
        usage = BatchUsage(
            input_tokens=row.input_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=row.cached_tokens),
            output_tokens=row.output_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=row.reasoning_tokens),
            total_tokens=row.input_tokens + row.output_tokens,
        )
    return Batch(
        id=row.id,
        endpoint=row.endpoint,
        errors=Errors.model_validate({"data": row.errors}) if row.errors else None,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        in_progress_at=row.in_progress_at,
        expires_at=row.expires_at,
        finalizing_at=row.finalizing_at,
        completed_at=row.completed_at,
        failed_at=row.failed_at,
        expired_at=row.expired_at,
        cancelling_at=row.cancelling_at,
        cancelled_at=row.cancelled_at,
        request_counts=BatchRequestCounts(
            total=row.total, completed=row.completed, failed=row.failed
        ),
        metadata=row.metadata_,
        model=row.model,
        usage=usage,
    )


def window_seconds(window: str) -> int:
    """``"24h"`` (OpenAI's only value); durations from 1h to 30d (``"48h"``, ``"7d"``) too."""
    match = WINDOW_PATTERN.fullmatch(window)
    seconds = int(match.group(1)) * WINDOW_UNITS[match.group(2)] if match else 0
    if not MIN_WINDOW_SECONDS <= seconds <= MAX_WINDOW_SECONDS:
        raise invalid(
            f"Invalid completion_window {window[:32]!r}: use '24h' (or a duration between "
            "'1h' and '30d', such as '48h' or '7d').",
            "completion_window",
        )
    return seconds


def check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise invalid(
            f"metadata may have at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}.",
            "metadata",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise invalid(
                f"metadata key {key[:20]!r}... is longer than {MAX_METADATA_KEY} characters.",
                "metadata",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise invalid(
                f"metadata value for {key!r} is longer than {MAX_METADATA_VALUE} characters.",
                "metadata",
            )


def _priority(metadata: dict[str, str] | None) -> int:
    """``metadata.priority`` as a 32-bit signed integer (higher runs first)."""
    raw = (metadata or {}).get("priority", "0")
    try:
        value = int(raw) if raw.strip().lstrip("+-").isascii() else None
    except ValueError:
        value = None
    if value is None or not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise invalid(
            f"metadata.priority must be an integer between {PRIORITY_MIN} and {PRIORITY_MAX}.",
            "metadata",
        )
    return value


async def check_webhook_url(settings: Settings, metadata: dict[str, str] | None) -> None:
    """``metadata.webhook_url`` must be http(s) and (unless allowed) not a private target."""
    url = (metadata or {}).get("webhook_url")
    if url is None:
        return
    try:
        await check_url(url, AllowList(settings.webhook_allowed_hosts))
    except RefusedURL as exc:
        raise invalid(
            f"metadata.webhook_url {exc}.",
            "metadata.webhook_url",
            "invalid_webhook_url",
        ) from None


def check_endpoint_served(settings: Settings, endpoint: str) -> None:
    """400 when no served model is of a kind that serves ``endpoint`` (see ``models/kinds.py``)."""
    kinds = settings.model_kinds
    if any(kind_serves(kind, endpoint) for kind in kinds.values()):
        return
    served = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
    raise invalid(
        f"No served model supports {endpoint}. Served models: {served}.",
        "endpoint",
    )


@router.post("/batches", response_model=Batch)
async def create_batch(ctx: CtxDep, principal: PrincipalDep, request: BatchCreateRequest) -> Batch:
    """Checks the request, then creates the batch in one write session (no other held)."""
    if request.endpoint not in SUPPORTED_ENDPOINTS:
        raise invalid(
            f"Unsupported endpoint {request.endpoint!r}. Supported: "
            f"{', '.join(SUPPORTED_ENDPOINTS)}.",
            "endpoint",
        )
    check_endpoint_served(ctx.settings, request.endpoint)
    window = window_seconds(request.completion_window)
    check_metadata(request.metadata)
    priority = _priority(request.metadata)
    await check_webhook_url(ctx.settings, request.metadata)
    spec = lifecycle.BatchSpec(
        endpoint=request.endpoint,
        input_file_id=request.input_file_id,
        completion_window=request.completion_window,
        window_seconds=window,
        metadata=request.metadata,
        priority=priority,
        output_expires_after=(
            request.output_expires_after.seconds if request.output_expires_after else None
        ),
        owner=principal.name,
    )
    try:
        row = await lifecycle.create(ctx, spec, scope=principal.scope)
    except lifecycle.InputFileGone:
        raise APIError(
            404,
            f"No such File object: '{request.input_file_id}'.",
            param="input_file_id",
            code="not_found",
        ) from None
    except lifecycle.InputFileNotForBatch as exc:
        raise invalid(
            f"File {exc.file_id} has purpose '{exc.purpose}'; a "
            "batch input file must be uploaded with purpose 'batch'.",
            "input_file_id",
        ) from None
    ctx.spawn(validate_batch(ctx.for_work, row.id, ctx.validating))
    return batch_object(row)


@router.get("/batches", response_model=ListPage[Batch])
async def list_batches(
    session: ReadSessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ListPage[Batch]:
    rows = await queries.list_batches(session, limit=limit, after=after, owner=principal.scope)
    return page([batch_object(row) for row in rows], limit)


async def load_batch(session: AsyncSession, principal: Principal, batch_id: str) -> BatchRow:
    """The batch, if ``principal`` may see it (another key's batch is simply not found)."""
    return found(
        await queries.get_batch(session, batch_id, owner=principal.scope), "batch", batch_id
    )


@router.get("/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(session: ReadSessionDep, principal: PrincipalDep, batch_id: str) -> Batch:
    return batch_object(await load_batch(session, principal, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(ctx: CtxDep, principal: PrincipalDep, batch_id: str) -> Batch:
    # The ownership check's connection goes back to the pool before cancel takes another.
    async with ctx.read_sessions() as session:
        await load_batch(session, principal, batch_id)
    try:
        row = await lifecycle.cancel(ctx, batch_id)
    except lifecycle.IllegalTransition as exc:
        raise APIError(409, str(exc), code="invalid_state") from None
    except lifecycle.NoSuchBatch:
        raise not_found("batch", batch_id) from None
    ctx.spawn(finalize_batch(ctx.for_work, batch_id))
    return batch_object(row)


@router.get("/batches/{batch_id}/results")
async def batch_results(
    ctx: CtxDep, session: ReadSessionDep, principal: PrincipalDep, batch_id: str
) -> StreamingResponse:
    row = await load_batch(session, principal, batch_id)
    output = await queries.get_file(session, row.output_file_id) if row.output_file_id else None
    if output is None:
        raise APIError(
            404,
            f"Batch {batch_id} has no output file (status '{row.status}'); "
            "results are available once it completes with at least one success.",
            code="output_not_ready",
        )
    return stream_file(ctx, output)


@router.get("/batches/{batch_id}/deliveries", response_model=DeliveryList)
async def batch_deliveries(
    session: ReadSessionDep, principal: PrincipalDep, batch_id: str
) -> DeliveryList:
    """Webhook deliveries and result-handler runs for the batch's final event."""
    await load_batch(session, principal, batch_id)
    rows = await outbox.for_batch(session, batch_id)
    return DeliveryList(data=[await delivery_object(session, row) for row in rows])


async def delivery_object(session: AsyncSession, row: DeliveryRow) -> Delivery:
    history = await outbox.attempts_of(session, row.id)
    columns = {name: getattr(row, name) for name in Delivery.model_fields if hasattr(row, name)}
    return Delivery.model_validate(
        {
            **columns,
            "target": display_target(row.target)
            if row.kind == DeliveryKind.WEBHOOK
            else row.target,
            "history": [DeliveryAttempt.model_validate(a, from_attributes=True) for a in history],
        }
    )
