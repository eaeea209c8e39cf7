"""Blob storage interface: blocking file-like I/O, called from worker threads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

from vllm_batch.storage.health import StorageHealth, StorageStatus, storage_status


class BlobStorage(Protocol):
    """Where file contents live; keys are relative paths such as ``files/file-abc``.

    A write refused for lack of space raises ``StorageFull`` (``storage/refusal.py``) and
    is recorded in ``health``.
    """

    health: StorageHealth

    def describe(self) -> str:
        """Where blobs go, for messages: ``local directory /x``, ``S3 bucket s3://b/p``."""
        ...

    def usage(self) -> tuple[int, int] | None:
        """(free, total) bytes, or None where the backend has no such numbers."""
        ...

    def open_read(self, key: str, offset: int = 0) -> AbstractContextManager[BinaryIO]:
        """Open ``key`` for streaming reads starting at byte ``offset``."""
        ...

    def open_write(self, key: str) -> AbstractContextManager[BinaryIO]:
        """Open ``key`` for writing; the blob appears atomically when the block exits cleanly."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; missing keys are ignored."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Every key under the folder ``prefix``."""
        ...


def read_status(storage: BlobStorage, min_free_bytes: int) -> StorageStatus:
    """``storage_status`` of ``storage`` now; blocking (a stat): call it in a thread."""
    return storage_status(storage.describe(), storage.usage(), storage.health, min_free_bytes)
