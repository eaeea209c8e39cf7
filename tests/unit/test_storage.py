"""Blob storage backends: local files and S3 (against a real moto server over HTTP).

The behavioural tests run on both backends; S3-specific ones cover multipart uploads,
aborts and ranged reads.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError

from tests.s3_fixtures import S3Server, s3_server  # noqa: F401
from vllm_batch.storage import LocalStorage, S3Storage, open_storage
from vllm_batch.storage.blob import BlobStorage
from vllm_batch.storage.s3 import MAX_RESUMES, MIN_PART_SIZE, READ_BUFFER_SIZE

PART = MIN_PART_SIZE  # moto, like S3, rejects smaller non-final parts
LINES = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * (i % 37)) for i in range(200))


class Boom(Exception):
    pass


@pytest.fixture
def bucket(s3_server: S3Server) -> str:  # noqa: F811
    return s3_server.new_bucket()


@pytest.fixture
def s3(s3_server: S3Server, bucket: str) -> S3Storage:  # noqa: F811
    return S3Storage(bucket, "some/prefix/", s3_server.client(), part_size=PART)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStorage:
    if request.param == "local":
        return LocalStorage(tmp_path / "blobs")
    return request.getfixturevalue("s3")  # type: ignore[no-any-return]


def write(storage: BlobStorage, key: str, data: bytes, piece: int = 1000) -> None:
    with storage.open_write(key) as handle:
        for start in range(0, len(data), piece):
            handle.write(data[start : start + piece])


def read(storage: BlobStorage, key: str, offset: int = 0) -> bytes:
    with storage.open_read(key, offset) as handle:
        return handle.read()


# ------------------------------------------------------------------ both backends


def test_round_trip_exists_size_delete(storage: BlobStorage) -> None:
    assert not storage.exists("files/a")
    write(storage, "files/a", LINES)
    assert storage.exists("files/a")
    assert storage.size("files/a") == len(LINES)
    assert read(storage, "files/a") == LINES
    storage.delete("files/a")
    assert not storage.exists("files/a")
    storage.delete("files/a")  # missing: fine
    storage.delete("never/there")


def test_empty_blob(storage: BlobStorage) -> None:
    write(storage, "batches/b/errors.jsonl", b"")
    assert storage.exists("batches/b/errors.jsonl")
    assert storage.size("batches/b/errors.jsonl") == 0
    assert read(storage, "batches/b/errors.jsonl") == b""


def test_offset_reads(storage: BlobStorage) -> None:
    write(storage, "files/a", LINES)
    for offset in (0, 1, 100, len(LINES) - 1, len(LINES)):
        assert read(storage, "files/a", offset) == LINES[offset:], offset


def test_line_iteration_keeps_newlines(storage: BlobStorage) -> None:
    data = LINES + b"no newline at the end"
    write(storage, "files/a", data)
    expected = data.splitlines(keepends=True)
    with storage.open_read("files/a") as handle:
        assert list(handle) == expected
    second = len(expected[0])
    with storage.open_read("files/a", second) as handle:
        assert next(iter(handle)) == expected[1]
        assert handle.read(5) == expected[2][:5]
        assert handle.readline() == expected[2][5:]


def test_small_reads_cover_everything(storage: BlobStorage) -> None:
    write(storage, "files/a", LINES)
    pieces = []
    with storage.open_read("files/a", 7) as handle:
        while piece := handle.read(13):
            assert len(piece) <= 13
            pieces.append(piece)
    assert b"".join(pieces) == LINES[7:]


def test_failed_write_leaves_nothing(storage: BlobStorage) -> None:
    with pytest.raises(Boom), storage.open_write("files/a") as handle:
        handle.write(LINES)
        raise Boom
    assert not storage.exists("files/a")


def test_failed_rewrite_keeps_previous_content(storage: BlobStorage) -> None:
    write(storage, "files/a", b"old\n")
    with pytest.raises(Boom), storage.open_write("files/a") as handle:
        handle.write(b"new and longer\n")
        raise Boom
    assert read(storage, "files/a") == b"old\n"
    write(storage, "files/a", b"new\n")
    assert read(storage, "files/a") == b"new\n"


def test_blob_appears_only_when_the_block_exits(storage: BlobStorage) -> None:
    with storage.open_write("files/a") as handle:
        handle.write(b"partial\n")
        assert not storage.exists("files/a")
    assert storage.exists("files/a")


@pytest.mark.parametrize("key", ["../outside", "files/../../outside", "/etc/passwd"])
def test_keys_escaping_the_root_are_rejected(storage: BlobStorage, key: str) -> None:
    with pytest.raises(ValueError), storage.open_write(key) as handle:
        handle.write(b"x")
    with pytest.raises(ValueError), storage.open_read(key):
        pass
    with pytest.raises(ValueError):
        storage.delete(key)


def test_missing_blob_is_file_not_found(storage: BlobStorage) -> None:
    with pytest.raises(FileNotFoundError), storage.open_read("files/missing"):
        pass
    with pytest.raises(FileNotFoundError):
        storage.size("files/missing")


# ------------------------------------------------------------------ local only


def test_local_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    write(storage, "files/a", LINES)
    with pytest.raises(Boom), storage.open_write("files/b") as handle:
        handle.write(LINES)
        raise Boom
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["a"]
    assert (tmp_path / "files" / "a").read_bytes() == LINES


# ------------------------------------------------------------------ S3 only


def big_payload(size: int) -> bytes:
    lines = []
    total = i = 0
    while total < size:
        line = b'{"custom_id": "request-%d", "pad": "%s"}\n' % (i, b"y" * (i % 500))
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def test_s3_multipart_write_and_ranged_reads(
    s3: S3Storage,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    data = big_payload(2 * PART + PART // 3)  # three parts, the last one short
    calls = record_calls(s3)
    with s3.open_write("files/big") as handle:
        handle.write(data[:100])
        handle.write(data[100 : PART + 5])  # crosses a part boundary in one write
        for start in range(PART + 5, len(data), 64 * 1024):
            handle.write(data[start : start + 64 * 1024])
    assert calls.count("CreateMultipartUpload") == 1
    assert calls.count("UploadPart") == 3
    assert calls.count("CompleteMultipartUpload") == 1
    assert "PutObject" not in calls

    assert s3_server.keys(bucket) == ["some/prefix/files/big"]
    head = s3_server.admin.head_object(Bucket=bucket, Key="some/prefix/files/big")
    assert head["ETag"].strip('"').endswith("-3")
    assert s3.size("files/big") == len(data)
    assert read(s3, "files/big") == data

    offset = data.index(b"\n", PART + 1000) + 1  # a line start inside the second part
    with s3.open_read("files/big", offset) as handle:
        lines = list(handle)
    assert lines == data[offset:].splitlines(keepends=True)
    assert s3_server.uploads_in_progress(bucket) == []


def test_s3_small_object_is_a_single_put(s3: S3Storage) -> None:
    calls = record_calls(s3)
    write(s3, "files/small", LINES)
    assert calls == ["PutObject"]


def test_s3_reads_are_ranged_and_streamed(s3: S3Storage) -> None:
    data = big_payload(PART + 1)
    write(s3, "files/big", data)
    headers: list[Any] = []
    s3.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: headers.append(request.headers)
    )
    with s3.open_read("files/big", 12345) as handle:
        assert handle.read(10) == data[12345:12355]
        # only one read buffer's worth has been pulled off the socket, not the whole object
        assert handle.raw._body._amount_read <= READ_BUFFER_SIZE  # type: ignore[attr-defined]
    with s3.open_read("files/big") as handle:
        assert handle.readline() == data.splitlines(keepends=True)[0]
    assert headers[0]["Range"] == b"bytes=12345-"
    assert "Range" not in headers[1]


class DroppingBody:
    """A response body whose connection breaks after ``good`` more bytes."""

    def __init__(self, body: Any, good: int, error: Exception) -> None:
        self.body = body
        self.good = good
        self.error = error

    def read(self, amt: int) -> bytes:
        if self.good <= 0:
            raise self.error
        data = bytes(self.body.read(min(amt, self.good)))
        self.good -= len(data)
        return data

    def close(self) -> None:
        self.body.close()


@pytest.mark.parametrize(
    "error",
    [
        ResponseStreamingError(error="connection reset"),
        IncompleteReadError(actual_bytes=1, expected_bytes=2),
    ],
    ids=["reset", "incomplete"],
)
def test_s3_read_resumes_after_a_dropped_connection(s3: S3Storage, error: Exception) -> None:
    data = big_payload(3 * READ_BUFFER_SIZE)
    write(s3, "files/a", data)
    calls = record_calls(s3)
    offset = 1000
    with s3.open_read("files/a", offset) as handle:
        first = handle.readline()
        raw = handle.raw  # type: ignore[attr-defined]
        raw._body = DroppingBody(raw._body, READ_BUFFER_SIZE // 2, error)
        rest = list(handle)
    assert first + b"".join(rest) == data[offset:]
    assert calls == ["GetObject", "GetObject"]


def test_s3_read_gives_up_after_repeated_failures(s3: S3Storage) -> None:
    data = big_payload(2 * READ_BUFFER_SIZE)
    write(s3, "files/a", data)
    error = ResponseStreamingError(error="connection reset")

    def break_every_body(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        if "ContentRange" in parsed:  # every reopened (ranged) body breaks at once
            parsed["Body"] = DroppingBody(parsed["Body"], 0, error)

    s3.client.meta.events.register("after-call.s3.GetObject", break_every_body)
    calls = record_calls(s3)
    with s3.open_read("files/a") as handle:
        handle.read(100)
        handle.raw._body = DroppingBody(handle.raw._body, 0, error)  # type: ignore[attr-defined]
        with pytest.raises(ResponseStreamingError):
            handle.read()
    assert calls == ["GetObject"] * (1 + MAX_RESUMES)


def test_s3_read_does_not_mix_object_versions(s3: S3Storage) -> None:
    data = big_payload(2 * READ_BUFFER_SIZE)
    write(s3, "files/a", data)
    error = ResponseStreamingError(error="connection reset")
    with s3.open_read("files/a") as handle:
        assert handle.read(10) == data[:10]
        write(s3, "files/a", data.upper())  # replaced while being read
        handle.raw._body = DroppingBody(handle.raw._body, 0, error)  # type: ignore[attr-defined]
        with pytest.raises(ClientError, match="PreconditionFailed"):
            handle.read()


def test_s3_abort_on_exception_leaves_no_object_or_upload(
    s3: S3Storage,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    data = big_payload(2 * PART + 10)
    calls = record_calls(s3)
    with pytest.raises(Boom), s3.open_write("files/big") as handle:
        handle.write(data)  # two parts already uploaded
        assert len(s3_server.uploads_in_progress(bucket)) == 1
        raise Boom
    assert calls.count("UploadPart") == 2
    assert "AbortMultipartUpload" in calls
    assert "CompleteMultipartUpload" not in calls
    assert s3_server.keys(bucket) == []
    assert s3_server.uploads_in_progress(bucket) == []
    assert not s3.exists("files/big")


def test_s3_failed_commit_aborts(
    s3: S3Storage,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    def fail(**kwargs: Any) -> None:
        raise Boom

    data = big_payload(PART + 10)
    s3.client.meta.events.register("before-call.s3.CompleteMultipartUpload", fail)
    with pytest.raises(Boom), s3.open_write("files/big") as handle:
        handle.write(data)
    assert s3_server.keys(bucket) == []
    assert s3_server.uploads_in_progress(bucket) == []


def test_s3_storage_without_prefix(s3_server: S3Server, bucket: str) -> None:  # noqa: F811
    storage = S3Storage(bucket, "", s3_server.client())
    write(storage, "files/a", b"x\n")
    assert s3_server.keys(bucket) == ["files/a"]


def test_s3_part_size_must_be_valid(s3_server: S3Server) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="part size"):
        S3Storage("bucket", "", s3_server.client(), part_size=1024)


def record_calls(storage: S3Storage) -> list[str]:
    """Names of the S3 operations the storage's client makes from now on."""
    calls: list[str] = []

    def hook(model: Any, **_: Any) -> None:
        calls.append(model.name)

    storage.client.meta.events.register("before-call.s3", hook)
    return calls


# ------------------------------------------------------------------ open_storage


def test_open_storage_local(tmp_path: Path) -> None:
    default = open_storage(None, tmp_path / "default")
    assert isinstance(default, LocalStorage) and default.root == tmp_path / "default"
    plain = open_storage(str(tmp_path / "plain"), tmp_path)
    assert isinstance(plain, LocalStorage) and plain.root == tmp_path / "plain"
    url = open_storage(f"file://{tmp_path / 'url'}", tmp_path)
    assert isinstance(url, LocalStorage) and url.root == tmp_path / "url"


@pytest.mark.parametrize("url", ["gs://bucket/x", "http://example.com/x", "azure://c"])
def test_open_storage_rejects_other_schemes(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage URL scheme"):
        open_storage(url, tmp_path)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bucket/x?region=eu"])
def test_open_storage_rejects_bad_s3_urls(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="S3"):
        open_storage(url, tmp_path)


def test_open_storage_s3_from_environment(
    tmp_path: Path,
    s3_server: S3Server,  # noqa: F811
    bucket: str,
) -> None:
    with s3_server.aws_env():
        storage = open_storage(f"s3://{bucket}/deep/prefix/", tmp_path)
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == (bucket, "deep/prefix")
    assert storage.client.meta.endpoint_url == s3_server.endpoint_url
    assert storage.client.meta.region_name == "us-east-1"
    write(storage, "files/a", b"hello\n")
    assert s3_server.keys(bucket) == ["deep/prefix/files/a"]
    assert s3_server.get(bucket, "deep/prefix/files/a") == b"hello\n"
    with storage.open_read("files/a") as handle:
        assert isinstance(handle, io.BufferedReader)


@pytest.fixture(autouse=True)
def _no_leaked_env() -> Iterator[None]:
    import os

    before = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    yield
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == before
