"""Every status column (and a file's purpose, a delivery's kind) checked by the schema."""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"

# (table, constraint, column, allowed values, nullable): frozen here, as of this revision.
CHECKS = [
    (
        "files",
        "ck_files_purpose",
        "purpose",
        (
            "assistants",
            "assistants_output",
            "batch",
            "batch_output",
            "fine-tune",
            "fine-tune-results",
            "vision",
            "user_data",
            "evals",
        ),
        False,
    ),
    (
        "uploads",
        "ck_uploads_status",
        "status",
        ("pending", "completed", "cancelled", "expired"),
        False,
    ),
    (
        "batches",
        "ck_batches_status",
        "status",
        (
            "validating",
            "failed",
            "in_progress",
            "finalizing",
            "completed",
            "expired",
            "cancelling",
            "cancelled",
        ),
        False,
    ),
    ("batches", "ck_batches_stop_reason", "stop_reason", ("cancel", "expire"), True),
    ("chunks", "ck_chunks_status", "status", ("queued", "running", "done"), False),
    ("deliveries", "ck_deliveries_kind", "kind", ("webhook", "handler"), False),
    ("deliveries", "ck_deliveries_status", "status", ("pending", "succeeded", "failed"), False),
]


def _condition(column: str, values: tuple[str, ...], nullable: bool) -> str:
    allowed = f"{column} IN ({', '.join(repr(value) for value in values)})"
    return f"{column} IS NULL OR {allowed}" if nullable else allowed


def upgrade() -> None:
    """PostgreSQL: ``CHECK`` constraints. SQLite cannot add one without rebuilding the table,
    and dropping a table that others reference would cascade-delete their rows: there, the
    same conditions are triggers that abort the insert or update (``SQLITE_CONSTRAINT``)."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, name, column, values, nullable in CHECKS:
        if not sqlite:
            op.create_check_constraint(name, table, _condition(column, values, nullable))
            continue
        new_value = _condition(f"NEW.{column}", values, nullable)
        for event in ("INSERT", f"UPDATE OF {column}"):
            op.execute(
                f"CREATE TRIGGER {name}_{event.split()[0].lower()} BEFORE {event} ON {table} "
                f"WHEN NOT ({new_value}) "
                f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {name}'); END"
            )


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for table, name, *_ in CHECKS:
        if not sqlite:
            op.drop_constraint(name, table, type_="check")
            continue
        for event in ("insert", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}_{event}")
