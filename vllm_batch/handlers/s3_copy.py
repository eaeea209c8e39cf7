"""The ``s3`` result handler: copies a batch's output and error files to an S3 prefix.

``VLLM_BATCH_S3_HANDLER_TARGET=s3://bucket/prefix`` puts them at
``<prefix>/<batch_id>/output.jsonl`` and ``<prefix>/<batch_id>/errors.jsonl``, byte for
byte. Each file streams from storage into boto3's managed (multipart) upload, one part at
a time per upload thread, never the whole file. Runs overwrite the same keys, and a file the
batch does not have is removed from the target, so the prefix mirrors the batch.

Credentials, region and endpoint come from the standard AWS environment, as for S3 storage
(``AWS_ACCESS_KEY_ID``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler
from vllm_batch.handlers.results import ResultStream
from vllm_batch.storage.s3 import DEFAULT_PART_SIZE, MIN_PART_SIZE, make_client

SAFE_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
UPLOAD_THREADS = 4  # at most this many parts of one file in memory at once
CONTENT_TYPE = "application/jsonl"


def parse_target(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as ``(bucket, prefix)``; the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"expected an S3 URL like s3://bucket/prefix, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an S3 handler target takes no query or fragment: {url!r}")
    prefix = parts.path.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        raise ValueError(f"invalid S3 key prefix in {url!r}")
    return parts.netloc, prefix


class S3CopyHandler(ResultHandler):
    """Mirror each finished batch's output and error files under an S3 prefix."""

    def __init__(
        self, settings: Settings, *, client: Any = None, part_size: int = DEFAULT_PART_SIZE
    ) -> None:
        super().__init__()
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.target = settings.s3_handler_target
        self.bucket, self.prefix = parse_target(self.target) if self.target else ("", "")
        self.part_size = part_size
        self._client = client
        self._lock = threading.Lock()

    def name(self) -> str:
        return "s3"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return bool(self.target)

    @property
    def client(self) -> Any:
        """One boto3 client (thread-safe), made from the environment on first use."""
        with self._lock:
            if self._client is None:
                self._client = make_client()
            return self._client

    def object_key(self, batch_id: str, name: str) -> str:
        if not SAFE_BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"unsafe batch id for an S3 key: {batch_id!r}")
        return "/".join(part for part in (self.prefix, batch_id, name) if part)

    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        if not isinstance(results, ResultStream):
            raise TypeError("the s3 handler needs a ResultStream (it copies the stored files)")
        if not self.bucket:
            raise RuntimeError("VLLM_BATCH_S3_HANDLER_TARGET is not set")
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(
            multipart_threshold=self.part_size,
            multipart_chunksize=self.part_size,
            max_concurrency=UPLOAD_THREADS,
        )
        batch = results.batch
        for source, name in ((batch.output_key, "output.jsonl"), (batch.error_key, "errors.jsonl")):
            key = self.object_key(batch_id, name)
            if source is None:
                # Idempotence: a file this batch does not have must not linger from elsewhere.
                self.client.delete_object(Bucket=self.bucket, Key=key)
                continue
            with results.storage.open_read(source) as stream:
                self.client.upload_fileobj(
                    stream,
                    self.bucket,
                    key,
                    ExtraArgs={"ContentType": CONTENT_TYPE},
                    Config=config,
                )
        return True
