"""What every process opens: the database (migrated), blob storage and work notifications."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vllm_batch.config import Settings
from vllm_batch.handlers.plan import DeliveryPlan
from vllm_batch.identity import InstanceId
from vllm_batch.storage.base import BlobStorage
from vllm_batch.store.notify import WorkNotifier


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


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[StoreContext]:
    """Connect to the database (migrating it), storage and notifications; close them after."""
    from vllm_batch.storage import open_storage
    from vllm_batch.store.db import create_engine, make_sessionmaker, migrate

    deliveries = DeliveryPlan.load(settings)  # fails fast on a bad handler setting
    db = create_engine(settings.resolved_database_url)
    notifier = WorkNotifier(settings.resolved_database_url)
    try:
        await migrate(db)
        await notifier.start()
        yield StoreContext(
            settings=settings,
            sessions=make_sessionmaker(db),
            read_sessions=make_sessionmaker(db, read_only=True),
            storage=open_storage(settings.storage_url, settings.data_dir),
            notifier=notifier,
            instance=InstanceId.new(),
            deliveries=deliveries,
        )
    finally:
        await notifier.close()
        await db.dispose()
