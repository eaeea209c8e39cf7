"""What a worker's parts share: settings, database, storage, engines, identity."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vllm_batch.config import Settings
from vllm_batch.engines.manager import EngineManager
from vllm_batch.storage.base import BlobStorage
from vllm_batch.store.notify import WorkNotifier


@dataclass
class StoreContext:
    """Database and blob storage: all the API and the finalizer need."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    storage: BlobStorage
    notifier: WorkNotifier
    instance_id: str
    """This process's identity as a lease owner: ``host-pid-random``."""


@dataclass
class WorkerContext(StoreContext):
    engines: EngineManager

    @property
    def worker_id(self) -> str:
        return self.instance_id
