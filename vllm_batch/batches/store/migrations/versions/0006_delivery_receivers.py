"""Deliveries name their receiver (webhook host or handler) for per-receiver isolation."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from vllm_batch.batches.store.outbox import receiver_of

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("receiver", sa.Text(), nullable=False, server_default=""))
    deliveries = sa.table(
        "deliveries",
        sa.column("id", sa.String()),
        sa.column("kind", sa.String()),
        sa.column("target", sa.Text()),
        sa.column("status", sa.String()),
        sa.column("receiver", sa.Text()),
    )
    connection = op.get_bind()
    pending = connection.execute(
        sa.select(deliveries.c.id, deliveries.c.kind, deliveries.c.target).where(
            deliveries.c.status == "pending"
        )
    ).all()
    for row_id, kind, target in pending:
        connection.execute(
            sa.update(deliveries)
            .where(deliveries.c.id == row_id)
            .values(receiver=receiver_of(kind, target))
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("receiver")
