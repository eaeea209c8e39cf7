"""The whole schema: files, uploads and their parts, batches, their chunks (work units),
saved results, deliveries.

Every status (and a file's purpose, a delivery's kind) is one of its enum's values, checked
by a ``CHECK`` constraint: rows carry the same enums the wire models and the state tables
(``batches/states.py``) use.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column

from vllm_batch.batches.states import (
    BatchStatus,
    ChunkStatus,
    DeliveryKind,
    DeliveryStatus,
    StopReason,
    UploadStatus,
)
from vllm_batch.protocol.file import FilePurpose


class Base(DeclarativeBase):
    pass


def checked(enum: type[StrEnum], name: str, length: int = 16) -> Enum:
    """A column holding ``enum``'s values, checked by the ``CHECK`` constraint ``name``."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


def owner_column() -> MappedColumn[Any]:
    """The name of the API key that created the row (``None``: made before keys owned rows)."""
    return mapped_column(String(64), nullable=True, index=True)


class FileRow(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(1024))
    purpose: Mapped[FilePurpose] = mapped_column(
        checked(FilePurpose, "ck_files_purpose", 32), index=True
    )
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    storage_key: Mapped[str] = mapped_column(String(1024))
    line_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    owner: Mapped[str | None] = owner_column()


class UploadRow(Base):
    """A file sent in parts (OpenAI's Upload); ``file_id`` is set once it is completed."""

    __tablename__ = "uploads"
    __table_args__ = (Index("ix_uploads_status_expires_at", "status", "expires_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)  # the declared total size
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(1024))
    purpose: Mapped[str] = mapped_column(String(32))
    mime_type: Mapped[str] = mapped_column(String(256))
    status: Mapped[UploadStatus] = mapped_column(
        checked(UploadStatus, "ck_uploads_status"), default=UploadStatus.PENDING
    )
    # Seconds after its creation at which the assembled file expires (``expires_after``).
    file_expires_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    owner: Mapped[str | None] = owner_column()


class UploadPartRow(Base):
    """One part of an upload, stored as its own blob until the upload ends."""

    __tablename__ = "upload_parts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    upload_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("uploads.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(1024))


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64), index=True)
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[BatchStatus] = mapped_column(
        checked(BatchStatus, "ck_batches_status"), index=True
    )
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The timeline between OpenAI's stamps (observability/timeline.py), epoch seconds with
    # their fraction, like the leases: the earliest time a worker sent one of the batch's
    # lines to the engine, and the latest time one of its result lines was saved.
    first_line_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_line_finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Set when the batch must stop early ("cancel" or "expire"); the final status follows it.
    stop_reason: Mapped[StopReason | None] = mapped_column(
        checked(StopReason, "ck_batches_stop_reason"), nullable=True
    )
    # Whoever assembles the output files holds this lease (epoch seconds).
    finalize_lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    finalize_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Seconds after creation at which output/error files expire (``output_expires_after``).
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    owner: Mapped[str | None] = owner_column()


class ChunkRow(Base):
    """A contiguous run of input lines that one worker claims at a time."""

    __tablename__ = "chunks"
    __table_args__ = (Index("ix_chunks_claim", "status", "model"),)

    id: Mapped[str] = mapped_column(String(96), primary_key=True)
    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    idx: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(256))
    start_line: Mapped[int] = mapped_column(Integer)
    end_line: Mapped[int] = mapped_column(Integer)
    start_offset: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[ChunkStatus] = mapped_column(
        checked(ChunkStatus, "ck_chunks_status"), default=ChunkStatus.QUEUED
    )
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Claims so far (also part of request ids)."""
    engine_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Real engine failures while running this chunk; only these count toward the limit."""


class ResultRow(Base):
    """One finished input line: the exact output line, saved once (primary key)."""

    __tablename__ = "results"

    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    is_error: Mapped[bool] = mapped_column(Boolean)
    data: Mapped[str] = mapped_column(Text)


class DeliveryRow(Base):
    """Outbox: one webhook target or result handler to run for a batch's final event.

    Written in the transaction that sets the final status; the dispatcher leases a row,
    runs it and records the outcome, retrying with backoff until ``give_up_at``.
    """

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(32))
    kind: Mapped[DeliveryKind] = mapped_column(checked(DeliveryKind, "ck_deliveries_kind"))
    target: Mapped[str] = mapped_column(Text)  # the URL, or the handler's name
    # "webhook:<host>" or "handler:<name>" (store.outbox.receiver_of): the unit of the
    # dispatcher's per-receiver concurrency limit and circuit breaker.
    receiver: Mapped[str] = mapped_column(Text, default="", server_default="")
    status: Mapped[DeliveryStatus] = mapped_column(checked(DeliveryStatus, "ck_deliveries_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    give_up_at: Mapped[float] = mapped_column(Float)
    last_attempt_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)


class DeliveryAttemptRow(Base):
    """One try of one delivery: when, how it ended, and why."""

    __tablename__ = "delivery_attempts"

    delivery_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float] = mapped_column(Float)
    ok: Mapped[bool] = mapped_column(Boolean)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str] = mapped_column(String(128))


class ServerSecretRow(Base):
    """Secrets the server generates once and keeps (the webhook signing secret)."""

    __tablename__ = "server_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
