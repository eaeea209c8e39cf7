"""The batch and chunk state machines: every status, every allowed move, nothing else.

Batch (OpenAI's statuses; ``stop_reason`` records a cancel or expiry request)::

    validating ─queue──────────▶ in_progress ─claim_finalization─▶ finalizing ─finish─▶ completed
     │  │ └─fail_validation─▶ failed      │  │
     │  └──cancel──▶ cancelling ◀──cancel──┘  │
     │                  └─finish─▶ cancelled   │
     └───────── expire, then finish ──────────┴─▶ expired

``failed``, ``completed``, ``cancelled`` and ``expired`` are terminal.

Chunk (a run of input lines leased by one worker at a time)::

    queued ──claim──▶ running ──finish──▶ done
      ▲                 │  ▲
      └────release──────┘  └─claim (lease expired: another worker takes over)

Upload (OpenAI's Uploads API: a file sent in parts, then assembled)::

    pending ──complete──▶ completed     (parts joined into a File, then deleted)
      ├─────cancel──────▶ cancelled     (parts deleted)
      └─────expire──────▶ expired       (housekeeping, past ``expires_at``; parts deleted)

Delivery (one webhook or result handler for a batch's final event, in the outbox)::

    pending ──attempt ok─────────────────────────▶ succeeded
      │ ▲
      │ └─attempt failed: retry before give_up_at
      └───refused, or out of retries (give_up_at)──▶ failed

Batch, upload and delivery statuses are OpenAI's wire values (``protocol/``); every status
column is checked by the schema (a ``CHECK`` constraint, ``store/rows.py``). Every
transition is one function of ``lifecycle.py`` (uploads: ``uploads.py``) running one
guarded statement in ``store/`` whose ``WHERE`` admits only the source statuses listed here,
and whose row count is checked: an illegal or lost-race move changes nothing and raises
``IllegalTransition``, the one way a refused transition is reported.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from vllm_batch.protocol.batch import BatchStatus
from vllm_batch.protocol.delivery import DeliveryKind, DeliveryStatus
from vllm_batch.protocol.upload import UploadStatus

__all__ = [
    "ACTIVE",
    "BATCH_MOVES",
    "CHUNK_MOVES",
    "DELIVERY_MOVES",
    "FINAL_STATUS",
    "STOPPABLE",
    "TERMINAL",
    "UPLOAD_MOVES",
    "BatchStatus",
    "ChunkStatus",
    "DeliveryKind",
    "DeliveryStatus",
    "IllegalTransition",
    "StopReason",
    "UploadStatus",
    "batch_sources",
    "chunk_sources",
    "delivery_sources",
    "sources",
    "upload_sources",
]


S = TypeVar("S", bound=StrEnum)


class ChunkStatus(StrEnum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # leased by ``lease_owner`` until ``lease_until``
    DONE = "done"  # every line has a saved result (terminal)


class StopReason(StrEnum):
    CANCEL = "cancel"
    EXPIRE = "expire"


class IllegalTransition(Exception):
    """A transition whose guard matched nothing: wrong status, lost race or lost lease.

    The one way a refused transition is reported, by every transition function.
    """


def terminal(*statuses: S) -> dict[S, frozenset[S]]:
    """Table rows for statuses nothing leaves."""
    return {status: frozenset() for status in statuses}


BATCH_MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING, BatchStatus.EXPIRED}
    ),
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.EXPIRED}
    ),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED}),
    **terminal(
        BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED
    ),
}

CHUNK_MOVES: dict[ChunkStatus, frozenset[ChunkStatus]] = {
    ChunkStatus.QUEUED: frozenset({ChunkStatus.RUNNING}),
    ChunkStatus.RUNNING: frozenset({ChunkStatus.RUNNING, ChunkStatus.QUEUED, ChunkStatus.DONE}),
    **terminal(ChunkStatus.DONE),
}

UPLOAD_MOVES: dict[UploadStatus, frozenset[UploadStatus]] = {
    UploadStatus.PENDING: frozenset(
        {UploadStatus.COMPLETED, UploadStatus.CANCELLED, UploadStatus.EXPIRED}
    ),
    **terminal(UploadStatus.COMPLETED, UploadStatus.CANCELLED, UploadStatus.EXPIRED),
}

DELIVERY_MOVES: dict[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: frozenset(
        {DeliveryStatus.PENDING, DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED}
    ),
    **terminal(DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED),
}

TERMINAL: frozenset[BatchStatus] = frozenset(s for s, moves in BATCH_MOVES.items() if not moves)
ACTIVE: frozenset[BatchStatus] = frozenset(BatchStatus) - TERMINAL
# Where a batch may be asked to stop (cancel or expire), and what the finished batch becomes.
STOPPABLE: frozenset[BatchStatus] = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})
FINAL_STATUS: dict[StopReason | None, BatchStatus] = {
    None: BatchStatus.COMPLETED,
    StopReason.CANCEL: BatchStatus.CANCELLED,
    StopReason.EXPIRE: BatchStatus.EXPIRED,
}


def sources(moves: Mapping[S, frozenset[S]], target: S) -> frozenset[S]:
    """The statuses from which ``moves`` (one of the tables above) allows ``target``."""
    return frozenset(s for s, allowed in moves.items() if target in allowed)


# The statuses from which a batch (chunk, upload, delivery) may move to a target status.
batch_sources = functools.partial(sources, BATCH_MOVES)
chunk_sources = functools.partial(sources, CHUNK_MOVES)
upload_sources = functools.partial(sources, UPLOAD_MOVES)
delivery_sources = functools.partial(sources, DELIVERY_MOVES)
