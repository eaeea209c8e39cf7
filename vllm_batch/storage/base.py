"""Blob storage interface: blocking file-like I/O, called from worker threads."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol


class BlobStorage(Protocol):
    """Where file contents live; keys are relative paths such as ``files/file-abc``."""

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
