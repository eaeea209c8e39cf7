"""Response shapes of the dashboard's JSON endpoints (``/v1/dashboard/...``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from vllm_batch.protocol.batch import Batch


class LineError(BaseModel):
    """One of a batch's first errors: a validation error or a failed line."""

    line: int | None = None
    custom_id: str | None = None
    code: str | None = None
    message: str


class BatchPhases(BaseModel):
    """Seconds between the points of a batch's timeline (``observability/timeline.py``);
    None until both ends of a phase are known. ``run`` grows while the batch runs."""

    validation: float | None = None
    """created → validated (``in_progress_at``)."""
    queue: float | None = None
    """validated → first line started."""
    run: float | None = None
    """first line started → last line finished."""
    finalize: float | None = None
    """last line finished → the final status."""


class DashboardBatch(Batch):
    """A batch as ``/v1/batches`` shows it, plus its first errors (and owner, for admins)
    and its timeline beyond OpenAI's stamps."""

    owner: str | None = None
    first_errors: list[LineError] = Field(default_factory=list)
    first_line_started_at: float | None = None
    """When a worker first sent one of its lines to the engine (epoch seconds)."""
    last_line_finished_at: float | None = None
    """When its last result line was saved (while it runs: the latest save so far)."""
    phases: BatchPhases = Field(default_factory=BatchPhases)


class ChunkInfo(BaseModel):
    """One chunk of a batch; ``lease_owner``/``lease_until`` only for admin callers."""

    index: int
    model: str
    start_line: int
    end_line: int
    lines: int
    status: str
    attempts: int
    engine_failures: int
    saved_lines: int
    lease_owner: str | None = None
    lease_until: float | None = None


class ChunkList(BaseModel):
    object: str = "list"
    batch_id: str
    data: list[ChunkInfo]
    has_more: bool = False
    owners_visible: bool
    finalize_owner: str | None = None


class Viewer(BaseModel):
    """Who is looking: the key's name (None when no keys are configured) and its rights."""

    name: str | None
    admin: bool
    keys_required: bool


class QueueEntry(BaseModel):
    model: str
    queued_chunks: int
    running_chunks: int
    queued_lines: int
    running_lines: int
    batches: int


class RemoteWorker(BaseModel):
    """A worker seen through its live chunk leases (admin callers only)."""

    id: str
    running_chunks: int
    models: list[str]
    lease_until: float


class Overview(BaseModel):
    viewer: Viewer
    models: list[str]
    endpoints: list[str] = Field(default_factory=list)
    """Batch endpoints some served model supports (the dashboard's endpoint choices)."""
    batches: dict[str, int]
    queue: list[QueueEntry]
    this_process: dict[str, Any]
    """This process's worker as ``/ready`` shows it (``id`` and details for admins only)."""
    workers: list[RemoteWorker]
    active_workers: int
    """Distinct owners of live chunk leases, this process's worker included."""


class DashboardHistory(BaseModel):
    """The last hour as this process sampled it, one column per quantity, oldest first.

    Admin callers see every batch's numbers, other keys their own batches' only. Rates are
    per second since the previous sample (None for the first); ``completed_lines`` and
    ``failed_lines`` count from the first sample shown.
    """

    object: str = "dashboard.history"
    scope: str
    """``all`` (admin callers) or ``own`` (the key's own batches)."""
    interval: float
    window: float
    t: list[float]
    lines_per_second: list[float | None]
    tokens_per_second: list[float | None]
    completed_lines: list[int]
    failed_lines: list[int]
    queued_lines: list[int]
    running_lines: list[int]


class BatchHistory(BaseModel):
    """One batch's progress over time: completed and failed lines at each point."""

    object: str = "dashboard.batch_history"
    batch_id: str
    total: int
    sampled: bool
    """False when this process never sampled the batch moving (e.g. it ran more than an
    hour ago): the points are then its start and end from the batch's timestamps."""
    t: list[float]
    completed: list[int]
    failed: list[int]
