"""Full storage at the storage layer, no engine: ENOSPC on a real 1 MiB tmpfs, an S3
server that refuses a write, the mapping of errors to ``StorageFull``, the readiness
verdict, and directories pruned after failed or deleted writes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.s3_fixtures import S3Server, s3_server  # noqa: F401
from tests.tmpfs import fill, small_tmpfs
from vllm_batch.storage import LocalStorage, S3Storage
from vllm_batch.storage.health import FAILURE_HOLD_SECONDS, StorageHealth, storage_status
from vllm_batch.storage.refusal import StorageFull, storage_refusal

MIB = 1024 * 1024


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ------------------------------------------------------------------ local disk


def test_enospc_is_storage_full_and_leaves_nothing(tiny_disk: Path) -> None:
    storage = LocalStorage(tiny_disk / "data")
    with pytest.raises(StorageFull) as caught, storage.open_write("uploads/up1/part1") as out:
        for _ in range(4):
            out.write(b"x" * (MIB // 2))
    message = str(caught.value)
    assert message.startswith(f"The file storage (local directory {tiny_disk / 'data'}) is full")
    assert message.endswith("is full: No space left on device (ENOSPC).")
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    # The temporary file and the upload's own folder are gone; the top folder stays.
    assert files_under(tiny_disk / "data") == ["uploads"]
    assert storage.health.refusals == 1 and storage.health.failed_at is not None
    assert storage.health.last_error == "No space left on device (ENOSPC)."
    # A write that fits clears the refusal.
    with storage.open_write("files/small") as out:
        out.write(b"ok\n")
    assert storage.health.failed_at is None and storage.health.refusals == 1


def test_disk_already_full_before_the_first_byte(tiny_disk: Path) -> None:
    storage = LocalStorage(tiny_disk / "data")
    fill(tiny_disk, leave=0)
    with pytest.raises(StorageFull), storage.open_write("batches/b1/a1/output.jsonl") as out:
        out.write(b"y" * 8192)
    assert files_under(tiny_disk / "data") == ["batches"]


def test_delete_prunes_empty_attempt_folders(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    for name in ("output.jsonl", "errors.jsonl"):
        with storage.open_write(f"batches/b1/a1/{name}") as out:
            out.write(b"{}\n")
    with storage.open_write("batches/b1/a2/output.jsonl") as out:
        out.write(b"{}\n")
    storage.delete("batches/b1/a1/output.jsonl")
    assert (tmp_path / "batches/b1/a1").is_dir()  # still holds errors.jsonl
    storage.delete("batches/b1/a1/errors.jsonl")
    left = ["batches", "batches/b1", "batches/b1/a2", "batches/b1/a2/output.jsonl"]
    assert files_under(tmp_path) == left
    storage.delete("batches/b1/a2/output.jsonl")
    storage.delete("batches/b1/a2/output.jsonl")  # deleting twice is fine
    assert files_under(tmp_path) == ["batches"]
    assert sorted(storage.iter_keys("batches")) == []


def test_local_iter_keys_and_prune_empty(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with storage.open_write("batches/b1/a1/output.jsonl") as out:
        out.write(b"{}\n")
    (tmp_path / "batches/b2/old-empty-attempt").mkdir(parents=True)
    (tmp_path / "batches/b1/a3").mkdir()
    assert list(storage.iter_keys("batches")) == ["batches/b1/a1/output.jsonl"]
    assert list(storage.iter_keys("nothing-here")) == []
    assert storage.prune_empty("batches") == 3  # b2/old-empty-attempt, b2, b1/a3
    left = ["batches", "batches/b1", "batches/b1/a1", "batches/b1/a1/output.jsonl"]
    assert files_under(tmp_path) == left


# ------------------------------------------------------------------ S3


class RefusingClient:
    """The real (moto) S3 client, except that writes answer as a full MinIO server does."""

    def __init__(self, client: Any, code: str, status: int) -> None:
        self._client = client
        self._error = {"Error": {"Code": code, "Message": "refused"}}
        self._error["ResponseMetadata"] = {"HTTPStatusCode": status}  # type: ignore[dict-item]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **_kwargs: Any) -> Any:
        raise ClientError(self._error, "PutObject")  # type: ignore[arg-type]

    def upload_part(self, **_kwargs: Any) -> Any:
        raise ClientError(self._error, "UploadPart")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [1000, 6 * MIB], ids=["put", "multipart"])
def test_s3_refusal_is_storage_full_and_leaves_nothing(
    s3_server: S3Server,  # noqa: F811
    size: int,
) -> None:
    bucket = s3_server.new_bucket()
    client = RefusingClient(s3_server.client(), "XMinioStorageFull", 507)
    storage = S3Storage(bucket, "pre", client, part_size=5 * MIB)
    with pytest.raises(StorageFull) as caught, storage.open_write("files/f1") as out:
        out.write(b"z" * size)
    assert str(caught.value).startswith(f"The file storage (S3 bucket s3://{bucket}/pre) is full")
    assert "XMinioStorageFull" in str(caught.value)
    assert s3_server.keys(bucket) == [] and s3_server.uploads_in_progress(bucket) == []
    assert storage.health.refusals == 1 and storage.usage() is None


def test_s3_iter_keys_strips_the_prefix(s3_server: S3Server) -> None:  # noqa: F811
    bucket = s3_server.new_bucket()
    storage = S3Storage(bucket, "pre/fix", s3_server.client())
    for key in ("batches/b1/a1/output.jsonl", "batches/b1/a2/errors.jsonl", "files/f1"):
        with storage.open_write(key) as out:
            out.write(b"{}\n")
    assert sorted(storage.iter_keys("batches")) == [
        "batches/b1/a1/output.jsonl",
        "batches/b1/a2/errors.jsonl",
    ]


# ------------------------------------------------------------------ the mapping (pure)


def client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")


def test_errors_that_mean_full() -> None:
    quota = storage_refusal(OSError(errno.EDQUOT, "Disk quota exceeded"), "local directory /d")
    assert quota is not None and quota.detail == "Disk quota exceeded (EDQUOT)."
    assert quota.message.startswith("The file storage (local directory /d) is full: ")
    for code in ("QuotaExceeded", "XMinioStorageFull", "EntityTooLarge"):
        refusal = storage_refusal(client_error(code, 400), "S3 bucket s3://b")
        assert refusal is not None and code in refusal.detail
    assert storage_refusal(client_error("Whatever", 507), "S3 bucket s3://b") is not None
    existing = StorageFull("x", "y")
    assert storage_refusal(existing, "z") is existing


def test_errors_that_do_not_mean_full() -> None:
    assert storage_refusal(OSError(errno.EIO, "I/O error"), "d") is None
    assert storage_refusal(PermissionError(errno.EACCES, "denied"), "d") is None
    assert storage_refusal(client_error("AccessDenied", 403), "s3") is None
    assert storage_refusal(client_error("SlowDown", 503), "s3") is None
    assert storage_refusal(ValueError("bad"), "d") is None
    # Not an OSError: the database retry logic must not take a full disk for an outage.
    assert not isinstance(StorageFull("x", "y"), OSError)


# ------------------------------------------------------------------ the verdict (pure)


def test_verdict_low_free_space() -> None:
    health = StorageHealth()
    low = storage_status("local directory /d", (MIB, 100 * MIB), health, 4 * MIB, now=1000.0)
    assert not low.ok and low.reason is not None
    assert "1.0 MiB free, below the 4.0 MiB minimum" in low.reason
    fine = storage_status("local directory /d", (8 * MIB, 100 * MIB), health, 4 * MIB)
    assert fine.ok and fine.reason is None and fine.free_bytes == 8 * MIB
    off = storage_status("local directory /d", (0, 100 * MIB), health, 0)
    assert off.ok  # a minimum of 0 turns the check off


def test_verdict_recent_refusal_heals_by_success_or_time() -> None:
    health = StorageHealth()
    health.refused(StorageFull("S3 bucket s3://b", "the server's drives are full"))
    assert health.failed_at is not None
    at = health.failed_at
    recent = storage_status("S3 bucket s3://b", None, health, 4 * MIB, now=at + 5)
    assert not recent.ok and recent.reason is not None
    assert "a write was refused 5 s ago: the server's drives are full" in recent.reason
    old = storage_status("S3 bucket s3://b", None, health, 4 * MIB, now=at + FAILURE_HOLD_SECONDS)
    assert old.ok and old.last_error == "the server's drives are full"
    health.succeeded()
    assert storage_status("S3 bucket s3://b", None, health, 4 * MIB, now=at + 5).ok
