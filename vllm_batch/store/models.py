"""The whole schema: files, batches, their chunks (work units) and saved results."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from vllm_batch.states import ChunkStatus


class Base(DeclarativeBase):
    pass


class FileRow(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(1024))
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)
    storage_key: Mapped[str] = mapped_column(String(1024))
    line_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The API key name that uploaded the file (``None``: created before ownership existed).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64), index=True)
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
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
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Set when the batch must stop early ("cancel" or "expire"); the final status follows it.
    stop_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Whoever assembles the output files holds this lease (epoch seconds).
    finalize_lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    finalize_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Seconds after creation at which output/error files expire (``output_expires_after``).
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The API key name that created the batch (``None``: created before ownership existed).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)


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
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.QUEUED)
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
