"""Which database errors the worker retries: real outages on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import exc, text

from tests.conftest import PG_ADMIN_DSN, create_pg_database, drop_pg_database
from vllm_batch.batches.store.db import create_engine, is_transient, make_sessionmaker
from vllm_batch.batches.store.db_retry import Backoff, retry_db


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def test_sqlite_write_lock_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (x INTEGER PRIMARY KEY)"))
        await conn.execute(text("PRAGMA busy_timeout=100"))
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        sessions = make_sessionmaker(engine)
        with pytest.raises(exc.OperationalError) as caught:
            async with sessions() as session, session.begin():
                await session.execute(text("PRAGMA busy_timeout=100"))
                await session.execute(text("INSERT INTO t VALUES (1)"))
        assert is_transient(caught.value)
    finally:
        holder.rollback()
        holder.close()
    async with make_sessionmaker(engine)() as session, session.begin():
        await session.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(exc.IntegrityError) as duplicate:
            async with session.begin_nested():
                await session.execute(text("INSERT INTO t VALUES (1)"))
    assert not is_transient(duplicate.value)
    await engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


async def test_postgres_refused_and_terminated_connections_are_transient(pg_url: str) -> None:
    url = pg_url
    name = url.rsplit("/", 1)[1]
    engine = create_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
            await _admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )
            with pytest.raises(exc.DBAPIError) as terminated:
                await session.execute(text("SELECT 1"))
        assert is_transient(terminated.value)
        await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        await _admin(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )
        await engine.dispose()
        with pytest.raises(exc.DBAPIError) as refused:
            async with sessions() as session:
                await session.execute(text("SELECT 1"))
        assert is_transient(refused.value)
        calls = 0

        async def probe() -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
                raise refused.value
            async with sessions() as session:
                return int(await session.scalar(text("SELECT 1")) or 0)

        assert await retry_db(probe, "probing", backoff=Backoff(first=0.01, max=0.05)) == 1
        assert calls == 2
    finally:
        await engine.dispose()
        await _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
