"""The ``postgres`` result handler: one row per result line in a PostgreSQL table.

``VLLM_BATCH_POSTGRES_HANDLER_DSN`` says where, ``VLLM_BATCH_POSTGRES_HANDLER_TABLE``
(default ``vllm_batch_results``, optionally ``schema.table``) which table; it is created
if missing. Like unquoted SQL names, the table name is folded to lower case (and quoted, so
reserved words work). Columns::

    batch_id, custom_id   TEXT, the primary key
    status                'succeeded' (no error and HTTP 200) or 'failed'
    status_code           the response's HTTP status, NULL if the request never ran
    output_text           the generated text (chat or completion), else NULL
    usage, raw            JSONB: the response body's usage, and the whole line
    created_at            when the row was inserted

A run inserts the batch's rows in one transaction, a page of rows at a time; rows already
there are left alone (``ON CONFLICT DO NOTHING``), so a retried run adds no duplicates.
PostgreSQL text cannot hold NUL characters or unpaired surrogates; they become U+FFFD.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler
from vllm_batch.handlers.results import answer_text

PAGE_SIZE = 500
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
Row = tuple[str, str, str, int | None, str | None, str | None, str]


def table_name(name: str) -> tuple[str | None, str]:
    """``[schema.]table`` validated as plain identifiers, lower-cased: ``(schema, table)``."""
    parts = name.strip().lower().split(".")
    if len(parts) > 2 or not all(IDENTIFIER.fullmatch(part) for part in parts):
        raise ValueError(
            f"invalid PostgreSQL table name {name!r}: use [schema.]table with letters, "
            "digits and underscores, not starting with a digit, at most 63 characters each"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


def asyncpg_dsn(dsn: str) -> str:
    """A ``postgresql://`` DSN for asyncpg, also from a SQLAlchemy ``postgresql+driver://`` URL."""
    return re.sub(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://", "postgresql://", dsn)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(text: str) -> str:
    """``text`` without what PostgreSQL text and JSONB refuse (NUL, unpaired surrogates)."""
    text = text.replace("\x00", "\ufffd")
    if not _encodable(text):  # a surrogate in a Python str is always unpaired
        text = "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in text)
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(str(key)): _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def _json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if "\\u0000" in text or not _encodable(text):
        text = json.dumps(_scrub(value), ensure_ascii=False)
    return text


def result_row(batch_id: str, result: dict[str, Any]) -> Row:
    """The table row for one output or error line."""
    custom_id = result.get("custom_id") or result.get("id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"result line without a custom_id in batch {batch_id}")
    response = result.get("response")
    response = response if isinstance(response, dict) else {}
    status_code = response.get("status_code")
    if not isinstance(status_code, int) or isinstance(status_code, bool):
        status_code = None
    ok = not result.get("error") and status_code == 200
    body = response.get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    text = answer_text(result)
    return (
        batch_id,
        _clean(custom_id),
        "succeeded" if ok else "failed",
        status_code,
        _clean(text) if text is not None else None,
        _json(usage) if usage is not None else None,
        _json(result),
    )


def pages(batch_id: str, results: Iterable[dict[str, Any]], size: int) -> Iterator[list[Row]]:
    page: list[Row] = []
    for result in results:
        page.append(result_row(batch_id, result))
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page


class PostgresHandler(ResultHandler):
    """Insert each finished batch's result lines into a PostgreSQL table."""

    def __init__(self, settings: Settings, *, page_size: int = PAGE_SIZE) -> None:
        super().__init__()
        self.dsn = settings.postgres_handler_dsn
        self.schema, self.table = table_name(settings.postgres_handler_table)
        self.page_size = page_size

    @property
    def qualified(self) -> str:
        """The quoted ``"schema"."table"`` (or ``"table"``) for SQL."""
        return ".".join(f'"{part}"' for part in (self.schema, self.table) if part)

    def name(self) -> str:
        return "postgres"

    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        return bool(self.dsn)

    async def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool:
        if not self.dsn:
            raise RuntimeError("VLLM_BATCH_POSTGRES_HANDLER_DSN is not set")
        conn = await asyncpg.connect(asyncpg_dsn(self.dsn))
        try:
            await self.ensure_table(conn)
            insert = (
                f"INSERT INTO {self.qualified} "
                "(batch_id, custom_id, status, status_code, output_text, usage, raw) "
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb) "
                "ON CONFLICT (batch_id, custom_id) DO NOTHING"
            )
            async with conn.transaction():
                for page in pages(batch_id, results, self.page_size):
                    await conn.executemany(insert, page)
        finally:
            await conn.close()
        return True

    async def ensure_table(self, conn: asyncpg.Connection) -> None:
        """Create the schema and table if missing; concurrent runs wait on a lock."""
        if await conn.fetchval("SELECT to_regclass($1)", self.qualified) is not None:
            return
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"vllm_batch:{self.qualified}"
            )
            if (
                self.schema
                and await conn.fetchval("SELECT to_regnamespace($1)", f'"{self.schema}"') is None
            ):
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.qualified} ("
                "batch_id TEXT NOT NULL, "
                "custom_id TEXT NOT NULL, "
                "status TEXT NOT NULL CHECK (status IN ('succeeded', 'failed')), "
                "status_code INTEGER, "
                "output_text TEXT, "
                "usage JSONB, "
                "raw JSONB NOT NULL, "
                "created_at TIMESTAMPTZ NOT NULL DEFAULT now(), "
                "PRIMARY KEY (batch_id, custom_id))"
            )
