"""How a storage backend is doing: free space (local) and its last refused write.

Every backend keeps a ``StorageHealth``: a write refused for lack of space marks it, the
next write that succeeds clears it. ``storage_status`` turns that and the free space into
one verdict for ``/ready`` and ``/metrics``: not ok while free space is below
``min_free_bytes`` (local storage only: S3 has no such number) or while a refused write
is less than ``FAILURE_HOLD_SECONDS`` old with no successful write since. The hold makes
the verdict heal by itself on a server that writes nothing more; a batch waiting to
finalize on a full disk retries within the hold and so keeps it marked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vllm_batch.observability import metrics
from vllm_batch.storage.refusal import StorageFull, storage_refusal

FAILURE_HOLD_SECONDS = 60.0


@dataclass
class StorageHealth:
    """Refused writes so far, and the last one until a write succeeds."""

    refusals: int = 0
    last_error: str | None = None
    failed_at: float | None = None

    def refused(self, refusal: StorageFull) -> None:
        self.refusals += 1
        self.last_error = refusal.detail
        self.failed_at = time.time()
        metrics.storage_refused()

    def succeeded(self) -> None:
        self.failed_at = None

    def raise_if_refused(self, exc: BaseException, where: str) -> None:
        """A write failed with ``exc``: if the storage refused it for lack of space, record
        that and raise ``StorageFull``; otherwise return (the caller re-raises ``exc``)."""
        refusal = storage_refusal(exc, where)
        if refusal is not None:
            self.refused(refusal)
            raise refusal from exc


@dataclass(frozen=True)
class StorageStatus:
    """The verdict on one storage backend, with what it rests on."""

    ok: bool
    where: str
    free_bytes: int | None
    total_bytes: int | None
    min_free_bytes: int
    failure_age: float | None
    last_error: str | None
    reason: str | None


def mib(amount: int) -> str:
    return f"{amount / 1024**2:.1f} MiB"


def storage_status(
    where: str,
    usage: tuple[int, int] | None,
    health: StorageHealth,
    min_free_bytes: int,
    now: float | None = None,
) -> StorageStatus:
    """The verdict from ``usage`` ((free, total) bytes, None if unknown) and ``health``."""
    at = time.time() if now is None else now
    reasons = []
    free, total = usage if usage is not None else (None, None)
    if free is not None and free < min_free_bytes:
        reasons.append(
            f"file storage is almost full: {mib(free)} free, below the "
            f"{mib(min_free_bytes)} minimum (VLLM_BATCH_STORAGE_MIN_FREE_BYTES)"
        )
    age = None if health.failed_at is None else max(0.0, at - health.failed_at)
    if age is not None and age < FAILURE_HOLD_SECONDS:
        reasons.append(f"a write was refused {age:.0f} s ago: {health.last_error}")
    return StorageStatus(
        ok=not reasons,
        where=where,
        free_bytes=free,
        total_bytes=total,
        min_free_bytes=min_free_bytes,
        failure_age=age,
        last_error=health.last_error,
        reason="; ".join(reasons) or None,
    )
