"""``/v1/batches``: create, list, retrieve, cancel, and ``/results`` (output content)."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from vllm_batch.api.deps import CtxDep, SessionDep
from vllm_batch.api.errors import APIError, not_found
from vllm_batch.api.files import page, stream_file
from vllm_batch.protocol.batch import (
    Batch,
    BatchCreateRequest,
    BatchRequestCounts,
    BatchUsage,
    Errors,
    InputTokensDetails,
    OutputTokensDetails,
)
from vllm_batch.protocol.ids import new_id, now
from vllm_batch.protocol.page import ListPage
from vllm_batch.service.validate import validate_batch
from vllm_batch.store import queries
from vllm_batch.store.models import BatchRow
from vllm_batch.validation import SUPPORTED_ENDPOINTS
from vllm_batch.worker.finalize import finalize_batch

router = APIRouter(tags=["batches"])
WINDOW_PATTERN = re.compile(r"^(\d+)([smhd])$")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512


def batch_object(row: BatchRow) -> Batch:
    usage = None
    if row.status in (
        "completed",
        "cancelled",
        "expired",
        "finalizing",
        "in_progress",
        "cancelling",
    ):
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
        status=row.status,  # type: ignore[arg-type]
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
    """``"24h"`` (OpenAI's only value); longer windows like ``"48h"``/``"7d"`` as an extension."""
    match = WINDOW_PATTERN.match(window)
    if not match or int(match.group(1)) <= 0:
        raise APIError(
            400,
            f"Invalid completion_window {window!r}: use '24h' (or a duration "
            "such as '48h' or '7d').",
            param="completion_window",
            code="invalid_value",
        )
    return int(match.group(1)) * WINDOW_UNITS[match.group(2)]


def check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise APIError(
            400,
            f"metadata may have at most {MAX_METADATA_PAIRS} pairs, got {len(metadata)}.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise APIError(
                400,
                f"metadata key {key[:20]!r}... is longer than {MAX_METADATA_KEY} characters.",
                param="metadata",
                code="invalid_value",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise APIError(
                400,
                f"metadata value for {key!r} is longer than {MAX_METADATA_VALUE} characters.",
                param="metadata",
                code="invalid_value",
            )


def _priority(metadata: dict[str, str] | None) -> int:
    try:
        return int((metadata or {}).get("priority", 0))
    except ValueError:
        raise APIError(
            400, "metadata.priority must be an integer.", param="metadata", code="invalid_value"
        ) from None


@router.post("/batches", response_model=Batch)
async def create_batch(ctx: CtxDep, session: SessionDep, request: BatchCreateRequest) -> Batch:
    if request.endpoint not in SUPPORTED_ENDPOINTS:
        raise APIError(
            400,
            f"Unsupported endpoint {request.endpoint!r}. Supported: "
            f"{', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint",
            code="invalid_value",
        )
    window = window_seconds(request.completion_window)
    check_metadata(request.metadata)
    priority = _priority(request.metadata)
    async with session.begin():
        input_file = await queries.get_file(session, request.input_file_id)
        if input_file is None:
            raise APIError(
                404,
                f"No such File object: '{request.input_file_id}'.",
                param="input_file_id",
                code="not_found",
            )
        if input_file.purpose != "batch":
            raise APIError(
                400,
                f"File {input_file.id} has purpose {input_file.purpose!r}; a "
                "batch input file must be uploaded with purpose 'batch'.",
                param="input_file_id",
                code="invalid_value",
            )
        created = now()
        row = BatchRow(
            id=new_id("batch_"),
            endpoint=request.endpoint,
            input_file_id=input_file.id,
            completion_window=request.completion_window,
            status="validating",
            metadata_=request.metadata,
            created_at=created,
            expires_at=created + window,
            total=0,
            completed=0,
            failed=0,
            input_tokens=0,
            cached_tokens=0,
            output_tokens=0,
            reasoning_tokens=0,
            priority=priority,
            output_expires_after=(
                request.output_expires_after.seconds if request.output_expires_after else None
            ),
        )
        session.add(row)
    ctx.spawn(validate_batch(ctx, row.id, ctx.validating))
    return batch_object(row)


@router.get("/batches", response_model=ListPage[Batch])
async def list_batches(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> ListPage[Batch]:
    rows = await queries.list_batches(session, limit=limit, after=after)
    return page([batch_object(row) for row in rows], limit)


async def load_batch(session: SessionDep, batch_id: str) -> BatchRow:
    row = await queries.get_batch(session, batch_id)
    if row is None:
        raise not_found("batch", batch_id)
    return row


@router.get("/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(session: SessionDep, batch_id: str) -> Batch:
    return batch_object(await load_batch(session, batch_id))


@router.post("/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(ctx: CtxDep, session: SessionDep, batch_id: str) -> Batch:
    async with session.begin():
        row = await load_batch(session, batch_id)
        stopping = await queries.request_stop(session, batch_id, "cancel", now())
        if not stopping and row.status not in ("cancelling", "cancelled"):
            raise APIError(
                409,
                f"Cannot cancel batch {batch_id}: its status is {row.status!r}.",
                code="invalid_state",
            )
    ctx.spawn(finalize_batch(ctx, batch_id))
    async with ctx.sessions() as fresh:
        return batch_object(await load_batch(fresh, batch_id))


@router.get("/batches/{batch_id}/results")
async def batch_results(ctx: CtxDep, session: SessionDep, batch_id: str) -> StreamingResponse:
    row = await load_batch(session, batch_id)
    output = await queries.get_file(session, row.output_file_id) if row.output_file_id else None
    if output is None:
        raise APIError(
            404,
            f"Batch {batch_id} has no output file (status {row.status!r}); "
            "results are available once it completes with at least one success.",
            code="output_not_ready",
        )
    return stream_file(ctx, output)
