"""What every process opens: the database (migrated), blob storage and work notifications."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from vllm_batch.batches.delivery_plan import DeliveryPlan
from vllm_batch.batches.store.identity import InstanceId
from vllm_batch.batches.store.notify import WorkNotifier
from vllm_batch.config import Settings
from vllm_batch.storage.blob import BlobStorage

if TYPE_CHECKING:
    from vllm_batch.batches.store.db import PoolSize

PoolRole = Literal["api", "worker"]


@dataclass
class StoreContext:
    """Database and blob storage: all the API, housekeeping and the finalizer need."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    """Write sessions (on SQLite they take the write lock at ``BEGIN``)."""
    read_sessions: async_sessionmaker[AsyncSession]
    """Read-only sessions: never block writers; use them for anything that only reads."""
    storage: BlobStorage
    notifier: WorkNotifier
    instance: InstanceId
    """This process's identity as a lease owner."""
    deliveries: DeliveryPlan
    """Webhooks and result handlers planned for every batch that reaches a final status."""
    finalizing: set[str] = field(default_factory=set)
    """Batches this process is finalizing right now (so it never starts a second attempt)."""
    finalize_again: set[str] = field(default_factory=set)
    """Batches asked to finalize while an attempt ran: that attempt looks once more."""
    finalize_backoff: dict[str, tuple[int, float]] = field(default_factory=dict)
    """Batches whose output the storage refused: (attempts so far, next try at epoch s)."""

    @property
    def instance_id(self) -> str:
        return str(self.instance)

    def shared(self) -> dict[str, Any]:
        """This context's fields, to build a richer context on the same connections."""
        return {f.name: getattr(self, f.name) for f in fields(StoreContext)}


@dataclass(frozen=True)
class Pool:
    """One connection pool and the write and read sessions drawn from it."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    read_sessions: async_sessionmaker[AsyncSession]

    def context_fields(self) -> dict[str, Any]:
        """The ``StoreContext`` fields this pool provides."""
        return {"sessions": self.sessions, "read_sessions": self.read_sessions}


def pool_size(settings: Settings, role: PoolRole) -> PoolSize:
    """The connection pool of API requests, or of background work (worker and services)."""
    from vllm_batch.batches.store.db import PoolSize

    busy = settings.sqlite_busy_timeout
    if role == "api":
        return PoolSize(
            settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout, busy
        )
    return PoolSize(
        settings.db_worker_pool_size,
        settings.db_worker_max_overflow,
        settings.db_pool_timeout,
        busy,
    )


@contextlib.asynccontextmanager
async def open_pool(settings: Settings, role: PoolRole) -> AsyncIterator[Pool]:
    """A connection pool of its own, sized for ``role``; disposed of on exit."""
    from vllm_batch.batches.store.db import create_engine, make_sessionmaker

    db = create_engine(settings.resolved_database_url, pool_size(settings, role))
    try:
        yield Pool(db, make_sessionmaker(db), make_sessionmaker(db, read_only=True))
    finally:
        await db.dispose()


@contextlib.asynccontextmanager
async def open_store(settings: Settings, role: PoolRole = "worker") -> AsyncIterator[StoreContext]:
    """Connect to the database (migrating it), storage and notifications; close them after.

    Its sessions come from the ``role`` pool (the API server opens a second pool for its
    requests with ``open_pool``).
    """
    from vllm_batch.batches.store.db import migrate
    from vllm_batch.storage import open_storage

    deliveries = DeliveryPlan.load(settings)  # fails fast on a bad handler setting
    notifier = WorkNotifier(settings.resolved_database_url)
    async with open_pool(settings, role) as pool:
        try:
            await migrate(pool.engine)
            await notifier.start()
            yield StoreContext(
                settings=settings,
                **pool.context_fields(),
                storage=open_storage(settings.storage_url, settings.data_dir),
                notifier=notifier,
                instance=InstanceId.new(),
                deliveries=deliveries,
            )
        finally:
            await notifier.close()
