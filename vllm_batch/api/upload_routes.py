"""``/v1/uploads``: a file sent in parts (OpenAI's Uploads API), then used like any file.

Create an upload, add parts (each streamed to its own blob), then complete it with the
part ids in order: the parts are joined into a File, checked exactly as ``POST /v1/files``
checks an upload. Cancelling (or expiry) deletes the parts. The statuses and moves are
drawn in ``vllm_batch/batches/states.py``.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, UploadFile
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.auth import Principal
from vllm_batch.api.deps import CtxDep, PrincipalDep, SessionDep
from vllm_batch.api.errors import APIError, found, invalid
from vllm_batch.api.file_routes import check_filename, check_purpose, file_expires_at, file_object
from vllm_batch.batches import uploads
from vllm_batch.batches.states import IllegalTransition, UploadStatus
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import FileRow, UploadPartRow, UploadRow
from vllm_batch.pipeline.input import UploadRejected
from vllm_batch.protocol.file import FileObject
from vllm_batch.protocol.ids import new_id, now
from vllm_batch.protocol.upload import (
    Upload,
    UploadCompleteRequest,
    UploadCreateRequest,
    UploadPart,
)

router = APIRouter(tags=["uploads"])


def upload_object(row: UploadRow, file: FileObject | None = None) -> Upload:
    upload = Upload.model_validate(row, from_attributes=True)
    upload.file = file
    return upload


def not_pending(row: UploadRow, at: int) -> APIError | None:
    """Why ``row`` takes no more parts and cannot be completed or cancelled, if it cannot."""
    if row.status == UploadStatus.PENDING and row.expires_at > at:
        return None
    if row.status in (UploadStatus.PENDING, UploadStatus.EXPIRED):
        return invalid(
            f"Upload {row.id} expired at {row.expires_at}; create a new upload.",
            "upload_id",
            "upload_expired",
        )
    return invalid(
        f"Upload {row.id} is already {row.status}; only a pending upload takes parts, "
        "completes or cancels.",
        "upload_id",
        "upload_not_pending",
    )


async def load_upload(
    session: AsyncSession, principal: Principal, upload_id: str, *, at: int, lock: bool = False
) -> UploadRow:
    """The pending upload, if ``principal`` may see it (another key's upload is not found)."""
    row = found(
        await queries.get_upload(session, upload_id, owner=principal.scope, lock=lock),
        "Upload",
        upload_id,
    )
    problem = not_pending(row, at)
    if problem is not None:
        raise problem
    return row


@router.post("/uploads", response_model=Upload)
async def create_upload(
    ctx: CtxDep, session: SessionDep, principal: PrincipalDep, body: UploadCreateRequest
) -> Upload:
    check_purpose(body.purpose)
    check_filename(body.filename, param="filename")
    limit = ctx.settings.max_chunked_upload_bytes
    if not 0 < body.bytes <= limit:
        raise invalid(
            f"bytes must be between 1 and {limit}, got {body.bytes}.",
            "bytes",
        )
    if not body.mime_type.strip() or len(body.mime_type) > 256:
        raise APIError(
            400, "mime_type must be a MIME type.", param="mime_type", code="invalid_value"
        )
    created = now()
    expiry = body.expires_after
    file_expires = (
        None if expiry is None else file_expires_at(created, expiry.anchor, expiry.seconds)
    )
    row = UploadRow(
        id=new_id("upload_"),
        bytes=body.bytes,
        created_at=created,
        expires_at=created + ctx.settings.upload_expiry_seconds,
        filename=body.filename,
        purpose=body.purpose,
        mime_type=body.mime_type,
        status=UploadStatus.PENDING,
        file_expires_after=None if file_expires is None else file_expires - created,
        owner=principal.name,
    )
    async with session.begin():
        await uploads.open_upload(session, row)
    return upload_object(row)


@router.post("/uploads/{upload_id}/parts", response_model=UploadPart)
async def add_part(
    ctx: CtxDep, session: SessionDep, principal: PrincipalDep, upload_id: str, data: UploadFile
) -> UploadPart:
    async with session.begin():  # refuse early, before storing anything
        await load_upload(session, principal, upload_id, at=now())
    part = UploadPartRow(
        id=new_id("part_"), upload_id=upload_id, created_at=now(), bytes=0, storage_key=""
    )
    part.storage_key = uploads.part_key(upload_id, part.id)
    limit = ctx.settings.max_upload_part_bytes

    def store() -> int:
        return uploads.store_part(data.file, ctx.storage, part.storage_key, max_bytes=limit)

    try:
        part.bytes = await anyio.to_thread.run_sync(store)
    except UploadRejected as exc:
        raise APIError(exc.status, exc.message, param="data", code=exc.code) from None
    try:
        async with session.begin():
            await load_upload(session, principal, upload_id, at=now(), lock=True)
            await queries.insert_upload_part(session, part)
    except BaseException:
        await anyio.to_thread.run_sync(ctx.storage.delete, part.storage_key)
        raise
    return UploadPart(id=part.id, created_at=part.created_at, upload_id=upload_id)


def ordered_parts(
    row: UploadRow, part_ids: list[str], parts: list[UploadPartRow]
) -> list[UploadPartRow]:
    """The parts in ``part_ids`` order; a 400 for a repeated or unknown id or a total that
    differs from the size the upload was created with."""
    by_id = {part.id: part for part in parts}
    seen: set[str] = set()
    for part_id in part_ids:
        if part_id in seen:
            raise APIError(
                400, f"Part {part_id} is listed twice.", param="part_ids", code="duplicate_part"
            )
        seen.add(part_id)
        if part_id not in by_id:
            raise invalid(
                f"No such part of upload {row.id}: '{part_id}'.",
                "part_ids",
                "part_not_found",
            )
    total = sum(by_id[part_id].bytes for part_id in part_ids)
    if total != row.bytes:
        raise invalid(
            f"The parts hold {total} bytes, but upload {row.id} was created for {row.bytes} bytes.",
            "part_ids",
            "bytes_mismatch",
        )
    return [by_id[part_id] for part_id in part_ids]


@router.post("/uploads/{upload_id}/complete", response_model=Upload)
async def complete_upload(
    ctx: CtxDep,
    session: SessionDep,
    principal: PrincipalDep,
    upload_id: str,
    body: UploadCompleteRequest,
) -> Upload:
    started = now()
    async with session.begin():
        row = await load_upload(session, principal, upload_id, at=started)
        found = await queries.upload_parts(session, upload_id, body.part_ids)
    parts = ordered_parts(row, body.part_ids, list(found))
    file_id = new_id("file-")
    key = f"files/{file_id}"

    def assemble() -> int:
        scan = uploads.assemble(
            ctx.storage,
            [part.storage_key for part in parts],
            key,
            size=row.bytes,
            check_jsonl=row.purpose == "batch",
            md5=body.md5,
        )
        return scan.requests

    try:
        requests = await anyio.to_thread.run_sync(assemble)
    except UploadRejected as exc:
        param = "md5" if exc.code == "md5_mismatch" else "file"
        raise APIError(exc.status, exc.message, param=param, code=exc.code) from None
    except FileNotFoundError:  # a part vanished: cancelled or expired meanwhile
        async with session.begin():
            await load_upload(session, principal, upload_id, at=now())
        raise
    created = now()
    file = FileRow(
        id=file_id,
        bytes=row.bytes,
        created_at=created,
        filename=row.filename,
        purpose=row.purpose,
        expires_at=None if row.file_expires_after is None else created + row.file_expires_after,
        storage_key=key,
        line_count=requests if row.purpose == "batch" else None,
        owner=row.owner,
    )
    try:
        async with session.begin():
            try:
                await uploads.complete(session, upload_id, file, started)
            except IllegalTransition:
                raise await lost_race(session, upload_id, started) from None
    except BaseException:
        await anyio.to_thread.run_sync(ctx.storage.delete, key)
        raise
    await uploads.drop_upload_parts(ctx, upload_id)
    row.status, row.file_id = UploadStatus.COMPLETED, file_id
    return upload_object(row, file_object(file))


async def lost_race(session: AsyncSession, upload_id: str, at: int) -> APIError:
    """The error for a move whose guard failed: the upload ended meanwhile."""
    row = await queries.get_upload(session, upload_id)
    problem = None if row is None else not_pending(row, at)
    return problem or APIError(409, f"Upload {upload_id} changed meanwhile; try again.")


@router.post("/uploads/{upload_id}/cancel", response_model=Upload)
async def cancel_upload(
    ctx: CtxDep, session: SessionDep, principal: PrincipalDep, upload_id: str
) -> Upload:
    at = now()
    async with session.begin():
        row = await load_upload(session, principal, upload_id, at=at, lock=True)
        try:
            await uploads.cancel(session, upload_id, at)
        except IllegalTransition:
            raise await lost_race(session, upload_id, at) from None
    await uploads.drop_upload_parts(ctx, upload_id)
    row.status = UploadStatus.CANCELLED
    return upload_object(row)
