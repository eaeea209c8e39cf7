"""The ``s3`` result handler against moto's S3 server over real HTTP: the batch's files land
byte-identical under ``<prefix>/<batch_id>/``, big ones by multipart upload, and runs repeat
harmlessly."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from tests.integration.result_files import make_batch
from tests.s3_fixtures import S3Server, s3_server  # noqa: F401
from vllm_batch.config import Settings
from vllm_batch.handlers.s3_copy import S3CopyHandler, parse_target
from vllm_batch.storage import LocalStorage, S3Storage
from vllm_batch.storage.s3 import MIN_PART_SIZE


@pytest.fixture
def aws_env(s3_server: S3Server) -> Iterator[None]:  # noqa: F811
    """The handler builds its client from the AWS environment, as in production."""
    with s3_server.aws_env():
        yield


def test_copies_output_and_errors_byte_identical(
    s3_server: S3Server,  # noqa: F811
    aws_env: None,
    tmp_path: Path,
) -> None:
    bucket = s3_server.new_bucket("sink")
    files = make_batch(LocalStorage(tmp_path / "data"), "batch_abc123")
    assert files.errors is not None
    handler = S3CopyHandler(Settings(s3_handler_target=f"s3://{bucket}/exports/daily/"))
    assert handler.name() == "s3" and handler.enabled({})

    for _ in range(2):  # a retried delivery overwrites the same keys
        assert handler.handle("batch_abc123", files.stream, {}) is True
        assert sorted(s3_server.keys(bucket)) == [
            "exports/daily/batch_abc123/errors.jsonl",
            "exports/daily/batch_abc123/output.jsonl",
        ]
        assert s3_server.get(bucket, "exports/daily/batch_abc123/output.jsonl") == files.output
        assert s3_server.get(bucket, "exports/daily/batch_abc123/errors.jsonl") == files.errors
    head = s3_server.admin.head_object(Bucket=bucket, Key="exports/daily/batch_abc123/output.jsonl")
    assert head["ContentType"] == "application/jsonl"
    assert head["ContentLength"] == len(files.output)


def test_large_file_from_s3_storage_goes_multipart(
    s3_server: S3Server,  # noqa: F811
    aws_env: None,
) -> None:
    """An output file of three parts, read from S3 storage, uploaded part by part."""
    source, target = s3_server.new_bucket("store"), s3_server.new_bucket("sink")
    storage = S3Storage(source, "data", s3_server.client())
    files = make_batch(storage, "batch_big", errors=False, filler=5200, filler_size=100)
    assert 2 * MIN_PART_SIZE < len(files.output) < 3 * MIN_PART_SIZE
    handler = S3CopyHandler(Settings(s3_handler_target=f"s3://{target}"), part_size=MIN_PART_SIZE)

    assert handler.handle("batch_big", files.stream, {"project": "x"}) is True

    assert s3_server.keys(target) == ["batch_big/output.jsonl"]
    copied = s3_server.get(target, "batch_big/output.jsonl")
    assert hashlib.sha256(copied).digest() == hashlib.sha256(files.output).digest()
    etag = s3_server.admin.head_object(Bucket=target, Key="batch_big/output.jsonl")["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object of three parts
    assert s3_server.uploads_in_progress(target) == []


def test_a_batch_without_errors_leaves_no_stale_error_file(
    s3_server: S3Server,  # noqa: F811
    aws_env: None,
    tmp_path: Path,
) -> None:
    bucket = s3_server.new_bucket("sink")
    s3_server.admin.put_object(Bucket=bucket, Key="p/batch_ok/errors.jsonl", Body=b"stale\n")
    files = make_batch(LocalStorage(tmp_path), "batch_ok", errors=False)
    handler = S3CopyHandler(Settings(s3_handler_target=f"s3://{bucket}/p"))

    assert handler.handle("batch_ok", files.stream, {}) is True

    assert s3_server.keys(bucket) == ["p/batch_ok/output.jsonl"]
    assert s3_server.get(bucket, "p/batch_ok/output.jsonl") == files.output


def test_missing_bucket_fails_the_attempt(
    s3_server: S3Server,  # noqa: F811
    aws_env: None,
    tmp_path: Path,
) -> None:
    """An error surfaces (so the delivery is retried) rather than a silent success."""
    files = make_batch(LocalStorage(tmp_path), "batch_x")
    handler = S3CopyHandler(Settings(s3_handler_target="s3://no-such-bucket-here/p"))
    with pytest.raises(ClientError, match=r"NoSuchBucket"):
        handler.handle("batch_x", files.stream, {})


def test_settings_and_validation(tmp_path: Path) -> None:
    assert not S3CopyHandler(Settings()).enabled({})
    assert parse_target("s3://bucket") == ("bucket", "")
    assert parse_target("s3://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("bucket/prefix", "https://bucket/p", "s3:///p", "s3://b/a//c", "s3://b/../x"):
        with pytest.raises(ValueError):
            S3CopyHandler(Settings(s3_handler_target=bad))
    handler = S3CopyHandler(Settings(s3_handler_target="s3://bucket/p"), client=object())
    files = make_batch(LocalStorage(tmp_path), "batch_y")
    with pytest.raises(ValueError, match="unsafe batch id"):
        handler.handle("../../etc", files.stream, {})
