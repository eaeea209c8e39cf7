"""Initial schema: files, batches, chunks, results."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from vllm_batch.batches.store.migrations.steps import create_table, id_column, parent_column

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_table(
        "files",
        id_column(),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(1024), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("storage_key", sa.String(1024), nullable=False),
        sa.Column("line_count", sa.Integer(), nullable=True),
        indexes={"ix_files_purpose": ["purpose"]},
    )
    create_table(
        "batches",
        id_column(),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        *(
            sa.Column(f"{stamp}_at", sa.BigInteger(), nullable=True)
            for stamp in (
                "in_progress",
                "expires",
                "finalizing",
                "completed",
                "failed",
                "expired",
                "cancelling",
                "cancelled",
            )
        ),
        *(
            sa.Column(count, sa.Integer(), nullable=False)
            for count in ("total", "completed", "failed")
        ),
        *(
            sa.Column(f"{tokens}_tokens", sa.BigInteger(), nullable=False)
            for tokens in ("input", "cached", "output", "reasoning")
        ),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(16), nullable=True),
        sa.Column("finalize_lease_until", sa.Float(), nullable=True),
        indexes={"ix_batches_input_file_id": ["input_file_id"], "ix_batches_status": ["status"]},
    )
    create_table(
        "chunks",
        id_column(96),
        parent_column("batch_id", "batches"),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("start_line", sa.Integer(), nullable=False),
        sa.Column("end_line", sa.Integer(), nullable=False),
        sa.Column("start_offset", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        indexes={"ix_chunks_batch_id": ["batch_id"], "ix_chunks_claim": ["status", "model"]},
    )
    create_table(
        "results",
        parent_column("batch_id", "batches", primary_key=True),
        sa.Column("line", sa.Integer(), primary_key=True),
        sa.Column("is_error", sa.Boolean(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in ("results", "chunks", "batches", "files"):
        op.drop_table(table)
