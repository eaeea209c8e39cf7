"""What a worker's parts share: settings, database, storage, engines, identity."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vllm_batch.config import Settings
from vllm_batch.engines.manager import EngineManager
from vllm_batch.storage.base import BlobStorage
from vllm_batch.store.notify import WorkNotifier


def make_worker_id() -> str:
    """A lease-owner identity: ``host-pid-random`` (housekeeping parses host and pid)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class StoreContext:
    """Database and blob storage: all the API and the finalizer need."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    storage: BlobStorage
    notifier: WorkNotifier
    instance_id: str
    """This process's identity as a lease owner: ``host-pid-random``."""

    def shared(self) -> dict[str, Any]:
        """This context's fields, to build a richer context on the same connections."""
        return {f.name: getattr(self, f.name) for f in fields(StoreContext)}


@dataclass
class WorkerContext(StoreContext):
    engines: EngineManager

    @property
    def worker_id(self) -> str:
        return self.instance_id


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[StoreContext]:
    """Connect to the database (migrating it), storage and notifications; close them after."""
    from vllm_batch.storage import open_storage
    from vllm_batch.store.db import create_engine, make_sessionmaker, migrate

    db = create_engine(settings.resolved_database_url)
    notifier = WorkNotifier(settings.resolved_database_url)
    try:
        await migrate(db)
        await notifier.start()
        yield StoreContext(
            settings=settings,
            sessions=make_sessionmaker(db),
            storage=open_storage(settings.storage_url, settings.data_dir),
            notifier=notifier,
            instance_id=make_worker_id(),
        )
    finally:
        await notifier.close()
        await db.dispose()
