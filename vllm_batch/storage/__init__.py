"""File blob storage backends."""

from __future__ import annotations

from pathlib import Path

from vllm_batch.storage.blob import BlobStorage
from vllm_batch.storage.local import LocalStorage
from vllm_batch.storage.s3 import S3Storage


def open_storage(storage_url: str | None, default_dir: Path) -> BlobStorage:
    """Build the backend for ``storage_url``: a local path, ``file://`` or ``s3://bucket/prefix``.

    The default (``None``) is local storage under ``default_dir``. S3 credentials, region
    and endpoint come from the standard AWS environment (see ``vllm_batch.storage.s3``).
    """
    if storage_url is None:
        return LocalStorage(default_dir)
    if storage_url.startswith("file://"):
        return LocalStorage(Path(storage_url.removeprefix("file://")))
    if storage_url.startswith("s3://"):
        return S3Storage.from_url(storage_url)
    if "://" in storage_url:
        scheme = storage_url.split("://", 1)[0]
        raise ValueError(
            f"unsupported storage URL scheme {scheme!r} in {storage_url!r}: "
            "use a local path, file:///path or s3://bucket/prefix"
        )
    return LocalStorage(Path(storage_url))


__all__ = ["BlobStorage", "LocalStorage", "S3Storage", "open_storage"]
