"""A batch's timeline: when its first line went to the engine, when its last was saved."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

COLUMNS = ("first_line_started_at", "last_line_finished_at")


def upgrade() -> None:
    # Plain ``ALTER TABLE … ADD/DROP COLUMN`` on both databases (SQLite >= 3.35 drops one):
    # a batch-mode rebuild of ``batches`` on SQLite would cascade-delete its chunks and
    # results and lose the status triggers of 0007.
    for name in COLUMNS:
        op.add_column("batches", sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("batches", name)
