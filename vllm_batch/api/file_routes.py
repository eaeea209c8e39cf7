"""``/v1/files``: upload, list, retrieve, download, delete."""

from __future__ import annotations

from typing import Annotated, Literal, Protocol, TypeVar
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from vllm_batch.api.auth import Principal
from vllm_batch.api.deps import CtxDep, PrincipalDep, ReadSessionDep, SessionDep
from vllm_batch.api.errors import APIError, found, invalid
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import FileRow
from vllm_batch.pipeline.input import UploadRejected, UploadScan, copy_upload
from vllm_batch.protocol.file import UPLOAD_PURPOSES, FileDeleted, FileObject
from vllm_batch.protocol.ids import new_id, now
from vllm_batch.protocol.page import ListPage
from vllm_batch.storage.aio import iter_blob


class _HasId(Protocol):
    id: str


T = TypeVar("T", bound=_HasId)
router = APIRouter(tags=["files"])
MAX_FILE_EXPIRY_SECONDS = 30 * 24 * 3600
MAX_FILENAME_CHARS = 1024  # files.filename is String(1024)


def file_object(row: FileRow) -> FileObject:
    return FileObject.model_validate(row, from_attributes=True)


@router.post("/files", response_model=FileObject)
async def create_file(
    ctx: CtxDep,
    session: SessionDep,
    principal: PrincipalDep,
    file: UploadFile,
    purpose: Annotated[str, Form()],
    expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> FileObject:
    check_purpose(purpose)
    filename = upload_filename(file)
    created = now()
    expires_at = file_expires_at(created, expires_anchor, expires_seconds)
    file_id = new_id("file-")
    key = f"files/{file_id}"
    max_bytes = ctx.settings.max_upload_bytes

    def store() -> UploadScan:
        with ctx.storage.open_write(key) as dst:
            return copy_upload(file.file, dst, max_bytes=max_bytes, check_jsonl=purpose == "batch")

    try:
        scan = await anyio.to_thread.run_sync(store)
    except UploadRejected as exc:
        raise APIError(exc.status, exc.message, param="file", code=exc.code) from None
    row = FileRow(
        id=file_id,
        bytes=scan.bytes,
        created_at=created,
        filename=filename,
        purpose=purpose,
        expires_at=expires_at,
        storage_key=key,
        line_count=scan.requests if purpose == "batch" else None,
        owner=principal.name,
    )
    try:
        async with session.begin():
            await queries.insert_file(session, row)
    except BaseException:
        await anyio.to_thread.run_sync(ctx.storage.delete, key)
        raise
    return file_object(row)


def upload_filename(file: UploadFile) -> str:
    """The stored name: at most ``MAX_FILENAME_CHARS`` characters and no control characters."""
    return check_filename(file.filename or "upload.jsonl", param="file")


def check_filename(name: str, *, param: str) -> str:
    """``name`` if it may be stored as a filename, else a 400 naming ``param``."""
    if len(name) > MAX_FILENAME_CHARS:
        raise invalid(
            f"The filename is {len(name)} characters long; the limit is {MAX_FILENAME_CHARS}.",
            param,
        )
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise invalid(
            "The filename may not contain control characters.",
            param,
        )
    return name


def check_purpose(purpose: str) -> str:
    """``purpose`` if a client may upload a file for it, else a 400."""
    if purpose not in UPLOAD_PURPOSES:
        raise invalid(
            f"Invalid purpose {purpose!r}. Expected one of: {', '.join(sorted(UPLOAD_PURPOSES))}.",
            "purpose",
        )
    return purpose


def file_expires_at(created: int, anchor: str | None, seconds: int | None) -> int | None:
    """``expires_after[anchor]``/``[seconds]`` as a timestamp (None: never), or a 400."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise invalid(
            "expires_after.anchor must be 'created_at'.",
            "expires_after.anchor",
        )
    if seconds is None or not 3600 <= seconds <= MAX_FILE_EXPIRY_SECONDS:
        raise invalid(
            "expires_after.seconds must be between 3600 and 2592000.",
            "expires_after.seconds",
        )
    return created + seconds


@router.get("/files", response_model=ListPage[FileObject])
async def list_files(
    session: ReadSessionDep,
    principal: PrincipalDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> ListPage[FileObject]:
    rows = await queries.list_files(
        session, purpose=purpose, limit=limit, after=after, order=order, owner=principal.scope
    )
    return page([file_object(row) for row in rows], limit)


def page(items: list[T], limit: int) -> ListPage[T]:
    """A list page from ``limit + 1`` fetched items."""
    data = items[:limit]
    return ListPage(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(items) > limit,
    )


async def load_file(session: AsyncSession, principal: Principal, file_id: str) -> FileRow:
    """The file, if ``principal`` may see it (another key's file is simply not found)."""
    return found(await queries.get_file(session, file_id, owner=principal.scope), "File", file_id)


@router.get("/files/{file_id}", response_model=FileObject)
async def retrieve_file(
    session: ReadSessionDep, principal: PrincipalDep, file_id: str
) -> FileObject:
    return file_object(await load_file(session, principal, file_id))


@router.get("/files/{file_id}/content")
async def file_content(
    ctx: CtxDep, session: ReadSessionDep, principal: PrincipalDep, file_id: str
) -> StreamingResponse:
    return stream_file(ctx, await load_file(session, principal, file_id))


def stream_file(ctx: CtxDep, row: FileRow) -> StreamingResponse:
    return StreamingResponse(
        iter_blob(ctx.storage, row.storage_key),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": content_disposition(row.filename),
        },
    )


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` fallback and the exact RFC 5987 ``filename*``."""
    fallback = "".join(
        char if 32 <= ord(char) < 127 and char not in '"\\' else "_" for char in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.delete("/files/{file_id}", response_model=FileDeleted)
async def delete_file(
    ctx: CtxDep, session: SessionDep, principal: PrincipalDep, file_id: str
) -> FileDeleted:
    async with session.begin():
        row = await load_file(session, principal, file_id)
        batch_id = await queries.file_used_by_active_batch(session, file_id)
        if batch_id is not None:
            raise APIError(
                409,
                f"File {file_id} is the input of batch {batch_id}, which is "
                "still running; cancel it or wait until it ends.",
                param="file_id",
                code="file_in_use",
            )
        await queries.delete_file(session, file_id)
    await anyio.to_thread.run_sync(ctx.storage.delete, row.storage_key)
    return FileDeleted(id=file_id, deleted=True)
