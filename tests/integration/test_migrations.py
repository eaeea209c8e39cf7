"""Applying every Alembic migration yields exactly the schema the models declare,
on SQLite and PostgreSQL; applying them twice is a no-op; the schema checks every status;
the latest migration (the batch timeline) goes down and up again without losing rows."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect
from sqlalchemy.exc import IntegrityError

from vllm_batch.batches.store.db import MIGRATIONS_DIR, create_engine, migrate
from vllm_batch.batches.store.rows import Base


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_match_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


# A row that breaks each check, inserted with SQL (the ORM's enums would refuse it first).
BAD_ROWS = {
    "ck_files_purpose": "INSERT INTO files (id, bytes, created_at, filename, purpose, "
    "storage_key) VALUES ('f', 1, 0, 'x', 'bogus', 'k')",
    "ck_uploads_status": "INSERT INTO uploads (id, bytes, created_at, expires_at, filename, "
    "purpose, mime_type, status) VALUES ('u', 1, 0, 1, 'x', 'batch', 't', 'bogus')",
    "ck_batches_status": "INSERT INTO batches (id, endpoint, input_file_id, completion_window, "
    "status, created_at, total, completed, failed, input_tokens, cached_tokens, output_tokens, "
    "reasoning_tokens, priority) "
    "VALUES ('b2', 'e', 'f', '24h', 'bogus', 0, 0, 0, 0, 0, 0, 0, 0, 0)",
    "ck_batches_stop_reason": "UPDATE batches SET stop_reason = 'bogus' WHERE id = 'b'",
    "ck_chunks_status": "INSERT INTO chunks (id, batch_id, idx, model, start_line, end_line, "
    "start_offset, status, attempts, engine_failures) "
    "VALUES ('c', 'b', 0, 'm', 0, 1, 0, 'bogus', 0, 0)",
    "ck_deliveries_kind": "INSERT INTO deliveries (id, batch_id, event_id, event_type, kind, "
    "target, receiver, status, attempts, created_at, give_up_at) "
    "VALUES ('d1', 'b', 'e', 't', 'bogus', 'x', '', 'pending', 0, 0, 1)",
    "ck_deliveries_status": "INSERT INTO deliveries (id, batch_id, event_id, event_type, kind, "
    "target, receiver, status, attempts, created_at, give_up_at) "
    "VALUES ('d2', 'b', 'e', 't', 'webhook', 'x', '', 'bogus', 0, 0, 1)",
}
GOOD_BATCH = (
    "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at, "
    "total, completed, failed, input_tokens, cached_tokens, output_tokens, reasoning_tokens, "
    "priority) VALUES ('b', 'e', 'f', '24h', 'validating', 0, 0, 0, 0, 0, 0, 0, 0, 0)"
)


async def test_status_columns_are_checked(database_url: str) -> None:
    """Every status (and a file's purpose, a delivery's kind) outside its enum is refused by
    the database itself, naming the check; a valid row goes in."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(GOOD_BATCH)
        for name, statement in BAD_ROWS.items():
            with pytest.raises(IntegrityError, match=name):
                async with engine.begin() as conn:
                    await conn.exec_driver_sql(statement)
        async with engine.connect() as conn:
            statuses = (await conn.exec_driver_sql("SELECT status FROM batches")).all()
        assert statuses == [("validating",)]
    finally:
        await engine.dispose()


TIMELINE = {"first_line_started_at", "last_line_finished_at"}


def _downgrade(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def _batch_columns(connection: Connection) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns("batches")}


async def test_timeline_migration_goes_down_and_up(database_url: str) -> None:
    """0008 adds the two timeline columns and drops them again in place: the batch and its
    chunk survive (no table rebuild: on SQLite that would cascade-delete the chunks and lose
    0007's status triggers), and upgrading again gives the models' schema."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(GOOD_BATCH.replace("'b'", "'tl'"))
            await conn.exec_driver_sql(
                BAD_ROWS["ck_chunks_status"]
                .replace("'c', 'b'", "'tl:0', 'tl'")
                .replace("'bogus'", "'queued'")
            )
            await conn.exec_driver_sql(
                "UPDATE batches SET first_line_started_at = 1.25, last_line_finished_at = 2.5 "
                "WHERE id = 'tl'"
            )
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0007")
        async with engine.connect() as conn:
            assert TIMELINE.isdisjoint(await conn.run_sync(_batch_columns))
            chunks = (await conn.exec_driver_sql("SELECT id FROM chunks")).all()
        assert chunks == [("tl:0",)]
        with pytest.raises(IntegrityError, match="ck_batches_status"):
            async with engine.begin() as conn:
                await conn.exec_driver_sql("UPDATE batches SET status = 'bogus' WHERE id = 'tl'")
        await migrate(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            stamps = (
                await conn.exec_driver_sql(
                    "SELECT first_line_started_at, last_line_finished_at FROM batches "
                    "WHERE id = 'tl'"
                )
            ).all()
        assert stamps == [(None, None)]
    finally:
        await engine.dispose()
