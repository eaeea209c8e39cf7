"""Delivery outbox (webhooks and result handlers), its attempts, and server secrets."""

from __future__ import annotations

import sqlalchemy as sa

from vllm_batch.batches.store.migrations.steps import (
    create_table,
    drop_table,
    id_column,
    parent_column,
)

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    create_table(
        "deliveries",
        id_column(),
        parent_column("batch_id", "batches"),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=True),
        sa.Column("give_up_at", sa.Float(), nullable=False),
        sa.Column("last_attempt_at", sa.Float(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        indexes={
            "ix_deliveries_batch_id": ["batch_id"],
            "ix_deliveries_due": ["status", "next_attempt_at"],
        },
    )
    create_table(
        "delivery_attempts",
        parent_column("delivery_id", "deliveries", primary_key=True),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(128), nullable=False),
    )
    create_table(
        "server_secrets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    drop_table("server_secrets")
    drop_table("delivery_attempts")
    drop_table("deliveries", ("ix_deliveries_due", "ix_deliveries_batch_id"))
