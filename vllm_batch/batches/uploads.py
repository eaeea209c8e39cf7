"""Uploads: their moves (``pending`` → ``completed``/``cancelled``/``expired``, drawn in
``states``), and their blobs: parts streamed to storage, joined in order into a checked
file, swept.

Each move is one guarded statement in the caller's transaction; one that matched nothing
(the upload ended or expired meanwhile) raises ``IllegalTransition``.

A part is its own blob (``uploads/<upload_id>/<part_id>``) until its upload ends. Completion
reads the parts one after another through a single stream, so a line may span parts, and
copies it into the file's blob through the same check ``POST /v1/files`` applies (same
errors, same line numbers). A batch file is held one line at a time, any other file one
MiB at a time. The join always streams, on S3 too: every byte of a batch file has to be
read for the check anyway, so a server-side copy would save only the write.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, BinaryIO

import anyio

from vllm_batch.batches.states import IllegalTransition
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.db import Session
from vllm_batch.batches.store.rows import FileRow, UploadRow
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.pipeline.input import UploadRejected, UploadScan, copy_limited, copy_upload
from vllm_batch.protocol.ids import now
from vllm_batch.storage.blob import BlobStorage

log = logging.getLogger(__name__)
COPY_SIZE = 1024 * 1024


async def open_upload(session: Session, row: UploadRow) -> None:
    """A new upload, ``pending``."""
    await queries.insert_upload(session, row)


async def complete(session: Session, upload_id: str, file: FileRow, at: int) -> None:
    """``pending`` → ``completed``, made into ``file`` (added in the same transaction)."""
    if not await queries.complete_upload(session, upload_id, file.id, at):
        raise IllegalTransition(f"upload {upload_id} is no longer pending")
    await queries.insert_file(session, file)


async def cancel(session: Session, upload_id: str, at: int) -> None:
    """``pending`` → ``cancelled``."""
    if not await queries.cancel_upload(session, upload_id, at):
        raise IllegalTransition(f"upload {upload_id} is no longer pending")


def part_key(upload_id: str, part_id: str) -> str:
    return f"uploads/{upload_id}/{part_id}"


def store_part(src: BinaryIO, storage: BlobStorage, key: str, *, max_bytes: int) -> int:
    """Copy one part to ``key`` a MiB at a time; its size, or ``UploadRejected`` if it is
    empty or over ``max_bytes`` (then nothing is stored)."""
    with storage.open_write(key) as dst:
        size = sum(map(len, copy_limited(_blocks(src), dst, max_bytes=max_bytes, what="Part")))
        if size == 0:
            raise UploadRejected("The part is empty.", code="empty_part")
    return size


def _blocks(src: BinaryIO) -> Iterator[bytes]:
    while data := src.read(COPY_SIZE):
        yield data


class PartsReader(io.RawIOBase):
    """The blobs ``keys`` read back to back as one stream, hashed (MD5) on the way."""

    def __init__(self, storage: BlobStorage, keys: Iterable[str]) -> None:
        self._storage = storage
        self._keys: Iterator[str] = iter(keys)
        self._open: AbstractContextManager[BinaryIO] | None = None
        self._handle: BinaryIO | None = None
        self.md5 = hashlib.md5(usedforsecurity=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._handle is None and not self._next():
                return 0
            assert self._handle is not None
            data = self._handle.read(len(view))
            if data:
                view[: len(data)] = data
                self.md5.update(data)
                return len(data)
            self._close_current()

    def _next(self) -> bool:
        key = next(self._keys, None)
        if key is None:
            return False
        self._open = self._storage.open_read(key)
        self._handle = self._open.__enter__()
        return True

    def _close_current(self) -> None:
        opened, self._open, self._handle = self._open, None, None
        if opened is not None:
            opened.__exit__(None, None, None)

    def close(self) -> None:
        self._close_current()
        super().close()


def assemble(
    storage: BlobStorage,
    part_keys: Sequence[str],
    key: str,
    *,
    size: int,
    check_jsonl: bool,
    md5: str | None,
) -> UploadScan:
    """Join ``part_keys`` in order into the blob ``key``, checked like an uploaded file.

    Raises ``UploadRejected`` (and stores nothing) if the joined bytes are not a valid
    file, exceed ``size``, or do not match ``md5``.
    """
    reader = PartsReader(storage, part_keys)
    with io.BufferedReader(reader, COPY_SIZE) as src, storage.open_write(key) as dst:
        if check_jsonl:  # line by line, as POST /v1/files checks a batch file
            scan = copy_upload(src, dst, max_bytes=size, check_jsonl=True)
        else:  # no lines to check: fixed blocks, so a file without newlines streams too
            scan = copy_blocks(src, dst, max_bytes=size)
        if md5 is not None and reader.md5.hexdigest() != md5.strip().lower():
            raise UploadRejected(
                "The md5 checksum does not match the uploaded bytes.", code="md5_mismatch"
            )
    return scan


def copy_blocks(src: BinaryIO, dst: BinaryIO, *, max_bytes: int) -> UploadScan:
    """Copy ``src`` a MiB at a time, refusing more than ``max_bytes`` like ``copy_upload``."""
    size = sum(map(len, copy_limited(_blocks(src), dst, max_bytes=max_bytes)))
    return UploadScan(bytes=size, requests=0)


async def delete_part_blobs(ctx: StoreContext, keys: Iterable[str]) -> None:
    for key in keys:
        await anyio.to_thread.run_sync(ctx.storage.delete, key)


async def drop_finished_parts(ctx: StoreContext) -> int:
    """Delete the blobs, then the rows, of parts whose upload is no longer pending."""
    async with ctx.read_sessions() as session:
        parts = await queries.finished_upload_parts(session)
    await delete_part_blobs(ctx, [part.storage_key for part in parts])
    async with ctx.sessions() as session, session.begin():
        await queries.delete_upload_parts(session, [part.id for part in parts])
    return len(parts)


async def sweep_uploads(ctx: StoreContext) -> int:
    """Expire pending uploads past ``expires_at`` and delete every finished upload's parts."""
    async with ctx.sessions() as session, session.begin():
        expired = await queries.expire_uploads(session, now())
    for upload_id in expired:
        log.info("upload %s expired", upload_id)
    return await drop_finished_parts(ctx)


async def drop_upload_parts(ctx: StoreContext, upload_id: str) -> None:
    """Delete the blobs, then the rows, of every part of ``upload_id`` (once it has ended)."""
    async with ctx.read_sessions() as session:
        parts = await queries.upload_parts(session, upload_id)
    await delete_part_blobs(ctx, [part.storage_key for part in parts])
    async with ctx.sessions() as session, session.begin():
        await queries.delete_upload_parts(session, [part.id for part in parts])
