"""``VLLM_BATCH_SQLITE_BUSY_TIMEOUT``: how long a SQLite write waits for another process's lock."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import exc, text

from vllm_batch.batches.store.db import create_engine, make_sessionmaker
from vllm_batch.batches.store_context import pool_size
from vllm_batch.config import Settings


def test_setting_reaches_both_pools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLLM_BATCH_SQLITE_BUSY_TIMEOUT", "2.5")
    settings = Settings(data_dir=tmp_path)
    assert pool_size(settings, "api").sqlite_busy_timeout == 2.5
    assert pool_size(settings, "worker").sqlite_busy_timeout == 2.5
    assert Settings(data_dir=tmp_path, sqlite_busy_timeout=60).sqlite_busy_timeout == 60


def test_a_write_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    settings = Settings(data_dir=tmp_path, sqlite_busy_timeout=1.0)
    engine = create_engine(f"sqlite+aiosqlite:///{path}", pool_size(settings, "worker"))
    sessions = make_sessionmaker(engine)

    async def write() -> float:
        started = time.monotonic()
        try:
            async with sessions() as session, session.begin():
                await session.execute(text("INSERT INTO t VALUES (1)"))
        except exc.OperationalError as error:
            assert "locked" in str(error)
            return time.monotonic() - started
        finally:
            await engine.dispose()
        raise AssertionError("the write went through while another connection held the lock")

    try:
        waited = asyncio.run(write())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.9 <= waited < 30, f"gave up after {waited:.1f} s, not after about 1 s"
