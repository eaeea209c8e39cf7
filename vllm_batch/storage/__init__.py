"""File blob storage backends."""

from __future__ import annotations

from pathlib import Path

from vllm_batch.storage.base import BlobStorage
from vllm_batch.storage.local import LocalStorage


def open_storage(storage_url: str | None, default_dir: Path) -> BlobStorage:
    """Build the backend for ``storage_url`` (a local path or ``file://``); default is local."""
    if storage_url is None:
        return LocalStorage(default_dir)
    if storage_url.startswith("file://"):
        return LocalStorage(Path(storage_url.removeprefix("file://")))
    if "://" in storage_url:
        raise ValueError(f"unsupported storage URL scheme: {storage_url!r}")
    return LocalStorage(Path(storage_url))


__all__ = ["BlobStorage", "LocalStorage", "open_storage"]
