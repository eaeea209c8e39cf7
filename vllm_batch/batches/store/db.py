"""Database engine creation and Alembic migrations applied on start."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, exc, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

log = logging.getLogger(__name__)
Session = AsyncSession
"""A database session, as the store's statements take it (the caller owns its transaction)."""
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 4_080_001
# Execution option marking an engine whose SQLite transactions take the write lock at BEGIN.
_WRITE_OPTION = "vllm_batch_write"


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@dataclass(frozen=True)
class PoolSize:
    """A connection pool: ``size`` kept open, up to ``overflow`` more under load, and how
    long (seconds) a checkout waits before it raises ``sqlalchemy.exc.TimeoutError``; on
    SQLite, how long (seconds) a statement waits for another process's lock."""

    size: int = 5
    overflow: int = 10
    timeout: float = 30.0
    sqlite_busy_timeout: float = 60.0


def create_engine(url: str, pool: PoolSize | None = None) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a generous busy timeout and real transactions.

    ``pool`` sizes its connection pool (default: SQLAlchemy's 5 + 10, 30 s); an in-memory
    SQLite database has a single shared connection instead.

    pysqlite only sends ``BEGIN`` at the first write, so a ``SELECT`` before it sees no
    lock at all. SQLAlchemy's documented fix disables that and emits ``BEGIN`` ourselves:
    write sessions (``make_sessionmaker``) send ``BEGIN IMMEDIATE`` and so serialise with
    every other writer from their first statement; read sessions send a plain ``BEGIN``.
    """
    if is_sqlite(url):
        path = url.split(":///", 1)[-1]
        sizing: dict[str, Any] = {}
        busy = (pool or PoolSize()).sqlite_busy_timeout
        if path and path != ":memory:" and "mode=memory" not in path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            sizing = _pool_options(pool or PoolSize())
        engine = create_async_engine(url, connect_args={"timeout": busy}, **sizing)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we send BEGIN ourselves (below)
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Connection) -> None:
            write = conn.get_execution_options().get(_WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_async_engine(
        url, pool_pre_ping=True, **_pool_options(pool or PoolSize(10, 10, 30.0))
    )


def _pool_options(pool: PoolSize) -> dict[str, Any]:
    return {"pool_size": pool.size, "max_overflow": pool.overflow, "pool_timeout": pool.timeout}


def make_sessionmaker(
    engine: AsyncEngine, *, read_only: bool = False
) -> async_sessionmaker[AsyncSession]:
    """Sessions for writes (SQLite: ``BEGIN IMMEDIATE``), or for reads (plain ``BEGIN``).

    Read sessions never block writers and may stay open while streaming; use them for
    anything that does not write.
    """
    bind = engine if read_only else engine.execution_options(**{_WRITE_OPTION: True})
    return async_sessionmaker(bind, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Many workers may start at once: one migrates, the others wait.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
    command.upgrade(_alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending Alembic migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


def _sqlite_path(url: str) -> str | None:
    path = url.split(":///", 1)[-1].split("?", 1)[0]
    return None if not path or path == ":memory:" else path


def _sqlite_write_probe(path: str, timeout: float) -> None:
    """Take and drop SQLite's write lock: a reader alone would not notice a held lock."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def probe_database(
    url: str, sessions: async_sessionmaker[AsyncSession], timeout: float
) -> None:
    """Raise unless the database answers within ``timeout``: on SQLite, its write lock can
    be taken (a reader alone would not notice a held lock); elsewhere ``SELECT 1``."""
    path = _sqlite_path(url) if is_sqlite(url) else None
    if path is not None:
        await anyio.to_thread.run_sync(_sqlite_write_probe, path, timeout)
        return
    async with asyncio.timeout(timeout), sessions() as session:
        await session.execute(text("SELECT 1"))


# SQLSTATE classes of a lost or refused connection: 08 connection exception, 53 insufficient
# resources, 57 operator intervention (server shutting down, backend terminated); 55000 is
# "database is not currently accepting connections".
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57")
_TRANSIENT_SQLSTATES = ("55000", "40001", "40P01")


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` comes from an unreachable, busy or restarting database.

    The one classifier for every database retry: a bug (integrity, SQL or data error) is
    not transient unless its SQLSTATE says the connection was lost or refused.
    """
    import asyncpg

    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated or isinstance(
            error, exc.OperationalError | exc.InterfaceError
        ):
            return True
        error = error.orig or error
    if isinstance(
        error,
        OSError
        | TimeoutError
        | exc.DisconnectionError
        | exc.TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.CannotConnectNowError,
    ):
        return True
    sqlstate = str(getattr(error, "sqlstate", "") or "")
    return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES or sqlstate in _TRANSIENT_SQLSTATES
