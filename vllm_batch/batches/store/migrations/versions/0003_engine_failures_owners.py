"""Per-chunk engine failure count; owning API key of files and batches."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("chunks") as chunks:
        chunks.add_column(
            sa.Column("engine_failures", sa.Integer(), nullable=False, server_default="0")
        )
    for table in ("files", "batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("owner", sa.String(64), nullable=True))
        op.create_index(f"ix_{table}_owner", table, ["owner"])


def downgrade() -> None:
    for table in ("files", "batches"):
        op.drop_index(f"ix_{table}_owner", table)
        with op.batch_alter_table(table) as batch:
            batch.drop_column("owner")
    with op.batch_alter_table("chunks") as chunks:
        chunks.drop_column("engine_failures")
