"""Blobs as objects in an S3 (or S3-compatible) bucket, under an optional key prefix.

Reads stream a ranged ``GetObject``; writes buffer one part at a time and use a multipart
upload once an object outgrows one part, so neither side holds a whole blob in memory.
An object appears only when its ``open_write`` block exits cleanly: on an exception the
multipart upload is aborted (or the single ``PutObject`` never sent).

Credentials, region and endpoint come from the standard AWS sources, which boto3 reads
itself: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or a profile or instance role),
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for an
S3-compatible server such as MinIO.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

from botocore.exceptions import (
    ClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from vllm_batch.storage.health import StorageHealth

DEFAULT_PART_SIZE = 8 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000
READ_BUFFER_SIZE = 256 * 1024
MAX_RESUMES = 5  # reconnections in a row, without progress, for one read


# What a response body's ``read`` raises when the connection breaks mid-stream.
_STREAM_ERRORS = (IncompleteReadError, ReadTimeoutError, ResponseStreamingError)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _ObjectReader(io.RawIOBase):
    """A raw, read-only stream over a ranged ``GetObject``, for ``io.BufferedReader``.

    A reader may sit unread for minutes (a worker reads a chunk's lines as the engine
    takes them) and the server may drop the idle connection; a read that fails mid-stream
    reopens the object from the current position, pinned to the same version by ETag.
    """

    def __init__(self, client: Any, bucket: str, key: str, response: dict[str, Any], start: int):
        self._client = client
        self._bucket = bucket
        self._key = key
        self._body = response["Body"]
        self._etag = response.get("ETag")
        self._position = start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        for attempt in range(MAX_RESUMES + 1):
            try:
                data = self._body.read(len(view))
            except _STREAM_ERRORS:
                if attempt == MAX_RESUMES:
                    raise
                self._reopen()
                continue
            view[: len(data)] = data
            self._position += len(data)
            return len(data)
        raise AssertionError("unreachable")

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        request: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": self._key,
            "Range": f"bytes={self._position}-",
        }
        if self._etag:
            request["IfMatch"] = self._etag
        self._body = self._client.get_object(**request)["Body"]

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _ObjectWriter(io.BufferedIOBase):
    """Collects writes into parts; ``commit`` publishes the object, ``abort`` discards it."""

    def __init__(self, client: Any, bucket: str, key: str, part_size: int) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._part_size = part_size
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        # Mirror boto3's own transfers: with the default checksum setting, ask S3 to keep a
        # CRC32 for the multipart object and send one with every part.
        checksums = getattr(client.meta.config, "request_checksum_calculation", None)
        self._checksum_args = (
            {"ChecksumAlgorithm": "CRC32"} if checksums == "when_supported" else {}
        )

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed S3 object writer")
        view = memoryview(data).cast("B")
        self._buffer += view
        while len(self._buffer) >= self._part_size:
            part = bytes(self._buffer[: self._part_size])
            del self._buffer[: self._part_size]
            self._upload_part(part)
        return len(view)

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            created = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._key, **self._checksum_args
            )
            self._upload_id = str(created["UploadId"])
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise ValueError(f"S3 object {self._key!r} needs more than {MAX_PARTS} parts")
        response = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
            **self._checksum_args,
        )
        part: dict[str, Any] = {"ETag": response["ETag"], "PartNumber": number}
        if self._checksum_args and "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        self._parts.append(part)

    def commit(self) -> None:
        """Upload what is left and make the object visible."""
        if self._upload_id is None:
            self._client.put_object(Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer))
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None
        self._buffer.clear()
        self.close()

    def abort(self) -> None:
        """Drop the buffered data and any uploaded parts; nothing becomes visible."""
        self._buffer.clear()
        upload_id, self._upload_id = self._upload_id, None
        self.close()
        if upload_id is not None:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id
            )


class S3Storage:
    """Stores each blob as the object ``<prefix>/<key>`` in ``bucket``."""

    def __init__(
        self, bucket: str, prefix: str, client: Any, *, part_size: int = DEFAULT_PART_SIZE
    ) -> None:
        if not bucket:
            raise ValueError("an S3 bucket name is required")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 part size must be at least {MIN_PART_SIZE} bytes")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.part_size = part_size
        self.health = StorageHealth()

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"S3 bucket {where}"

    def usage(self) -> tuple[int, int] | None:
        """Unknown: S3 reports no free space (a full server shows as refused writes)."""
        return None

    @classmethod
    def from_url(cls, url: str, *, part_size: int = DEFAULT_PART_SIZE) -> S3Storage:
        """``s3://bucket/optional/prefix``, with a client configured from the environment."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"expected an S3 URL like s3://bucket/prefix, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"an S3 storage URL takes no query or fragment: {url!r}")
        return cls(parts.netloc, parts.path, make_client(), part_size=part_size)

    def _key(self, key: str) -> str:
        segments = key.split("/")
        if not key or any(segment in ("", ".", "..") for segment in segments):
            raise ValueError(f"invalid storage key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def open_read(self, key: str, offset: int = 0) -> Iterator[BinaryIO]:
        name = self._key(key)
        request: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if offset:
            request["Range"] = f"bytes={offset}-"
        try:
            response = self.client.get_object(**request)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{name}") from exc
            if code != "InvalidRange":
                raise
            # Reading at (or past) the end of the object: like a local file, nothing.
            response = None
        if response is None:
            with io.BytesIO() as empty:
                yield empty
            return
        raw = _ObjectReader(self.client, self.bucket, name, response, offset)
        with io.BufferedReader(raw, READ_BUFFER_SIZE) as handle:
            yield cast(BinaryIO, handle)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        writer = _ObjectWriter(self.client, self.bucket, self._key(key), self.part_size)
        try:
            yield cast(BinaryIO, writer)
            writer.commit()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                writer.abort()
            self.health.raise_if_refused(exc, self.describe())
            raise
        self.health.succeeded()

    def delete(self, key: str) -> None:
        # DeleteObject succeeds for a missing key.
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def iter_keys(self, prefix: str) -> Iterator[str]:
        """Every blob under the folder ``prefix`` (keys relative to this storage's prefix)."""
        base = self._key(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base
        )
        for page in pages:
            for item in page.get("Contents", []):
                yield str(item["Key"])[skip:]

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(self._key(key)) is not None

    def size(self, key: str) -> int:
        name = self._key(key)
        head = self._head(name)
        if head is None:
            raise FileNotFoundError(f"s3://{self.bucket}/{name}")
        return int(head["ContentLength"])


def make_client() -> Any:
    """A thread-safe S3 client from the standard AWS environment and config files."""
    import boto3
    from botocore.config import Config

    # boto3 reads credentials, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    # (and their config-file equivalents) itself. A session of our own: the default one
    # is not thread-safe to create clients from.
    session = boto3.session.Session()
    config = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=32)
    return session.client("s3", config=config)
