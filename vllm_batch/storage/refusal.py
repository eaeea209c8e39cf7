"""Storage that refuses a write for lack of space: one exception, whatever the backend.

A local disk says so with ``ENOSPC`` (no space left) or ``EDQUOT`` (quota exceeded); an
S3-compatible server with an error code such as MinIO's ``XMinioStorageFull`` or
``QuotaExceeded``, or HTTP 507. ``storage_refusal`` turns either into ``StorageFull``,
which the API answers with 507 and the finalizer records on the batch while it retries.

``StorageFull`` is deliberately not an ``OSError``: the database retry logic treats any
``OSError`` as a database outage, and a full disk is not one.
"""

from __future__ import annotations

import errno
import os
from typing import Any

LOCAL_FULL_ERRNOS = {errno.ENOSPC: "ENOSPC", errno.EDQUOT: "EDQUOT"}
S3_FULL_CODES = {
    "XMinioStorageFull": "the server's drives are full",
    "XMinioAdminBucketQuotaExceeded": "the bucket quota is exceeded",
    "QuotaExceeded": "a quota is exceeded",
    "InsufficientStorage": "the server has no space left",
    "StorageFull": "the server has no space left",
    "EntityTooLarge": "the object is larger than the server accepts",
}
HTTP_INSUFFICIENT_STORAGE = 507


class StorageFull(Exception):
    """A write was refused for lack of space; ``where`` names the storage."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"The file storage ({where}) is full: {detail}")
        self.where = where
        self.detail = detail

    @property
    def message(self) -> str:
        return str(self)


def _client_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of a botocore ``ClientError``, without importing botocore."""
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status if isinstance(status, int) else 0


def storage_refusal(exc: BaseException, where: str) -> StorageFull | None:
    """``exc`` as a ``StorageFull`` for storage ``where``, or None if it is anything else."""
    if isinstance(exc, StorageFull):
        return exc
    if isinstance(exc, OSError) and exc.errno in LOCAL_FULL_ERRNOS:
        text = exc.strerror or os.strerror(exc.errno)
        return StorageFull(where, f"{text} ({LOCAL_FULL_ERRNOS[exc.errno]}).")
    error = _client_error(exc)
    if error is not None:
        code, status = error
        if code in S3_FULL_CODES:
            return StorageFull(where, f"{S3_FULL_CODES[code]} (S3 error {code}).")
        if status == HTTP_INSUFFICIENT_STORAGE:
            return StorageFull(where, f"the server answered 507 Insufficient Storage ({code}).")
    return None
