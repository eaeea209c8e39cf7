"""Uploads (OpenAI's Uploads API) and their parts."""

from __future__ import annotations

import sqlalchemy as sa

from vllm_batch.batches.store.migrations.steps import (
    create_table,
    drop_table,
    id_column,
    parent_column,
)

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    create_table(
        "uploads",
        id_column(),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(1024), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("mime_type", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("file_expires_after", sa.BigInteger(), nullable=True),
        sa.Column("file_id", sa.String(64), nullable=True),
        sa.Column("owner", sa.String(64), nullable=True),
        indexes={
            "ix_uploads_owner": ["owner"],
            "ix_uploads_status_expires_at": ["status", "expires_at"],
        },
    )
    create_table(
        "upload_parts",
        id_column(),
        parent_column("upload_id", "uploads"),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_key", sa.String(1024), nullable=False),
        indexes={"ix_upload_parts_upload_id": ["upload_id"]},
    )


def downgrade() -> None:
    drop_table("upload_parts", ("ix_upload_parts_upload_id",))
    drop_table("uploads", ("ix_uploads_status_expires_at", "ix_uploads_owner"))
