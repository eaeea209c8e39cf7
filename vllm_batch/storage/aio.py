"""Async wrappers that run blocking storage I/O in worker threads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import BinaryIO

import anyio

from vllm_batch.storage.blob import BlobStorage

READ_SIZE = 1024 * 1024


class AsyncBlobWriter:
    """``async with AsyncBlobWriter(storage, key) as w: await w.write(data)``."""

    def __init__(self, storage: BlobStorage, key: str) -> None:
        self._cm: AbstractContextManager[BinaryIO] = storage.open_write(key)
        self._handle: BinaryIO | None = None
        self.bytes = 0

    async def __aenter__(self) -> AsyncBlobWriter:
        self._handle = await anyio.to_thread.run_sync(self._cm.__enter__)
        return self

    async def write(self, data: bytes) -> None:
        assert self._handle is not None
        self.bytes += len(data)
        await anyio.to_thread.run_sync(self._handle.write, data)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self._cm.__exit__, exc_type, exc, tb)


async def iter_blob(storage: BlobStorage, key: str) -> AsyncIterator[bytes]:
    """Stream a blob in 1 MiB pieces."""
    cm = storage.open_read(key)
    handle = await anyio.to_thread.run_sync(cm.__enter__)
    try:
        while data := await anyio.to_thread.run_sync(handle.read, READ_SIZE):
            yield data
    finally:
        await anyio.to_thread.run_sync(cm.__exit__, None, None, None)
