"""Finalization lease owner; output file expiry requested at batch creation."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("finalize_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("output_expires_after", sa.BigInteger(), nullable=True))
    op.create_index("ix_files_expires_at", "files", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_files_expires_at", "files")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("output_expires_after")
        batch.drop_column("finalize_owner")
