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

Every transition is one guarded statement in ``store/queries.py`` whose ``WHERE`` admits
only the source statuses listed here, and whose row count is checked: an illegal or
lost-race move changes nothing and is reported to the caller.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"  # input file being checked
    FAILED = "failed"  # the input file was invalid (terminal)
    IN_PROGRESS = "in_progress"  # chunks queued or running
    FINALIZING = "finalizing"  # every line done; output files being written
    COMPLETED = "completed"  # output files written (terminal)
    EXPIRED = "expired"  # completion window passed; unfinished lines are errors (terminal)
    CANCELLING = "cancelling"  # cancel requested; waiting for running chunks to stop
    CANCELLED = "cancelled"  # cancelled; finished lines kept (terminal)


class ChunkStatus(StrEnum):
    QUEUED = "queued"  # waiting for a worker
    RUNNING = "running"  # leased by ``lease_owner`` until ``lease_until``
    DONE = "done"  # every line has a saved result (terminal)


class UploadStatus(StrEnum):
    PENDING = "pending"  # accepting parts
    COMPLETED = "completed"  # assembled into ``file_id`` (terminal)
    CANCELLED = "cancelled"  # cancelled by its owner (terminal)
    EXPIRED = "expired"  # not completed before ``expires_at`` (terminal)


class StopReason(StrEnum):
    CANCEL = "cancel"
    EXPIRE = "expire"


class IllegalTransition(Exception):
    """A transition whose guard matched nothing: wrong status, lost race or lost lease."""


BATCH_MOVES: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset(
        {BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING, BatchStatus.EXPIRED}
    ),
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.EXPIRED}
    ),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED}),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}

CHUNK_MOVES: dict[ChunkStatus, frozenset[ChunkStatus]] = {
    ChunkStatus.QUEUED: frozenset({ChunkStatus.RUNNING}),
    ChunkStatus.RUNNING: frozenset({ChunkStatus.RUNNING, ChunkStatus.QUEUED, ChunkStatus.DONE}),
    ChunkStatus.DONE: frozenset(),
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


def batch_sources(target: BatchStatus) -> frozenset[BatchStatus]:
    """The statuses from which a batch may move to ``target``."""
    return frozenset(s for s, moves in BATCH_MOVES.items() if target in moves)


def chunk_sources(target: ChunkStatus) -> frozenset[ChunkStatus]:
    """The statuses from which a chunk may move to ``target``."""
    return frozenset(s for s, moves in CHUNK_MOVES.items() if target in moves)
