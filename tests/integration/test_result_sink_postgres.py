"""The ``postgres`` result handler against the real PostgreSQL: one row per line with the
right values, nothing duplicated by repeated runs, the table created once even by concurrent
runs, and a failed run leaving no partial rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.result_files import ANSWERS, BatchFiles, make_batch
from vllm_batch.config import Settings
from vllm_batch.handlers.postgres import PostgresHandler, asyncpg_dsn, table_name
from vllm_batch.handlers.results import BatchInfo, ResultStream
from vllm_batch.storage import LocalStorage


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database (as a SQLAlchemy ``postgresql+asyncpg://`` URL, which users may give)."""
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


def fetch(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


def stored_text(text: str) -> str:
    """PostgreSQL text holds no NUL; the handler stores U+FFFD instead."""
    return text.replace("\x00", "\ufffd")


def check_rows(url: str, table: str, batch_id: str, files: BatchFiles) -> None:
    rows = fetch(
        url,
        f"SELECT custom_id, status, status_code, output_text, usage, raw, created_at "
        f"FROM {table} WHERE batch_id = $1",
        batch_id,
    )
    by_id = {row["custom_id"]: row for row in rows}
    assert len(by_id) == len(rows) == len(files.expected)
    raw_lines = [json.loads(line) for line in files.stream.raw_lines()]
    raw_by_id = {line["custom_id"]: line for line in raw_lines}
    for want in files.expected:
        row = by_id[want.custom_id]
        assert (row["status"], row["status_code"]) == (want.status, want.status_code)
        want_text = None if want.answer is None else stored_text(want.answer)
        assert row["output_text"] == want_text, want.custom_id
        assert (json.loads(row["usage"]) if row["usage"] else None) == want.usage
        raw = json.loads(row["raw"])
        assert raw["custom_id"] == want.custom_id
        line = json.dumps(raw_by_id[want.custom_id]).replace("\\u0000", "\ufffd")
        assert raw == json.loads(line)
        assert row["created_at"] is not None


def test_rows_once_per_line_with_values(pg_url: str, tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path), "batch_pg1", filler=30)
    handler = PostgresHandler(Settings(postgres_handler_dsn=pg_url), page_size=7)
    assert handler.name() == "postgres" and handler.enabled({})

    for _ in range(2):  # a retried delivery inserts nothing twice
        assert asyncio.run(handler.handle("batch_pg1", files.stream, {})) is True
        check_rows(pg_url, "vllm_batch_results", "batch_pg1", files)
    counts = fetch(
        pg_url,
        "SELECT status, count(*) AS n FROM vllm_batch_results GROUP BY status ORDER BY status",
    )
    assert [(row["status"], row["n"]) for row in counts] == [("failed", 3), ("succeeded", 41)]
    # The primary key is what makes reruns safe.
    pk = fetch(
        pg_url,
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = 'vllm_batch_results'::regclass AND i.indisprimary",
    )
    assert sorted(row["attname"] for row in pk) == ["batch_id", "custom_id"]


def test_schema_qualified_table_created_by_concurrent_runs(pg_url: str, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    batches = [make_batch(storage, f"batch_c{i}", errors=i % 2 == 0) for i in range(4)]
    handler = PostgresHandler(
        Settings(postgres_handler_dsn=pg_url, postgres_handler_table="Sink_Schema.Order")
    )
    assert handler.qualified == '"sink_schema"."order"'  # a reserved word, quoted

    async def run_all() -> list[bool]:
        return await asyncio.gather(
            *(handler.handle(files.stream.batch.id, files.stream, {}) for files in batches)
        )

    assert asyncio.run(run_all()) == [True] * 4
    for files in batches:
        check_rows(pg_url, 'sink_schema."order"', files.stream.batch.id, files)


def test_a_failing_run_leaves_no_partial_rows(pg_url: str, tmp_path: Path) -> None:
    """A line without a custom_id aborts the run after full pages went in: all rolled back."""
    storage = LocalStorage(tmp_path)
    files = make_batch(storage, "batch_bad", errors=False, filler=20)
    with storage.open_write("files/broken") as handle:
        handle.write(files.output + b'{"response": {"status_code": 200}}\n')
    stream = ResultStream(
        storage,
        BatchInfo(
            "batch_bad", "completed", "/v1/chat/completions", None, {}, "f", None, "files/broken"
        ),
    )
    handler = PostgresHandler(
        Settings(postgres_handler_dsn=pg_url, postgres_handler_table="atomic_results"),
        page_size=5,
    )
    with pytest.raises(ValueError, match="custom_id"):
        asyncio.run(handler.handle("batch_bad", stream, {}))
    assert fetch(pg_url, "SELECT count(*) AS n FROM atomic_results")[0]["n"] == 0


def test_unreachable_database_raises(tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path), "batch_z")
    handler = PostgresHandler(
        Settings(postgres_handler_dsn="postgresql://postgres@127.0.0.1:5432/vbt_no_such_db")
    )
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        asyncio.run(handler.handle("batch_z", files.stream, {}))


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a.b.c", 'x"; DROP TABLE t; --', "results;", "a-b", "sch.", ".t", "a" * 64],
)
def test_unsafe_table_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid PostgreSQL table name"):
        PostgresHandler(
            Settings(postgres_handler_dsn="postgresql://x/y", postgres_handler_table=name)
        )


def test_table_names_and_settings() -> None:
    assert table_name("vllm_batch_results") == (None, "vllm_batch_results")
    assert table_name("Analytics.Batch_Results2") == ("analytics", "batch_results2")
    assert table_name("user") == (None, "user")  # a reserved word works, being quoted
    assert not PostgresHandler(Settings()).enabled({})
    assert asyncpg_dsn("postgresql+asyncpg://u@h/db") == "postgresql://u@h/db"
    assert asyncpg_dsn("postgres://u@h/db") == "postgres://u@h/db"


def test_fixture_answers_are_tricky() -> None:
    """Guard the fixture itself: the answers really contain what these tests are about."""
    answers = "".join(ANSWERS)
    for needle in (",", '"', "'", "\n", "\r\n", "\x00", "🚀", "|", ";"):
        assert needle in answers
