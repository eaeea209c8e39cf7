"""The services a running app holds, created by the lifespan and reached via ``deps``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.batches.store_context import StoreContext
from vllm_batch.deliveries.dispatcher import DeliveryDispatcher
from vllm_batch.engines.manager import EngineManager
from vllm_batch.observability.history import History
from vllm_batch.runtime.supervise import TaskHealth
from vllm_batch.runtime.worker_process import WorkerProcess
from vllm_batch.worker.loop import Worker
from vllm_batch.worker.status import WorkerStatus, worker_status

log = logging.getLogger(__name__)


@dataclass
class AppContext(StoreContext):
    """The API's context: its sessions come from the API pool (``db_pool_size``)."""

    engines: EngineManager | None = None
    worker: Worker | None = None
    worker_health: TaskHealth | None = None
    worker_task: asyncio.Task[None] | None = None
    worker_process: WorkerProcess | None = None
    """serve's worker in its child process (``worker`` is then None)."""
    dispatcher: DeliveryDispatcher | None = None
    services: list[TaskHealth] = field(default_factory=list)
    """Supervised background services (housekeeping, validation sweeper)."""
    validating: set[str] = field(default_factory=set)
    """Batches this process is validating right now."""
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    work_store: StoreContext | None = None
    """The same store on the background pool: the worker, services and the tasks routes
    start (validation, finalization) use it, so API requests never starve them."""
    history: History | None = None
    """The dashboard's last hour of samples (``observability/history.py``)."""

    @property
    def for_work(self) -> StoreContext:
        """The context background work runs on (``work_store``, else this one)."""
        return self.work_store if self.work_store is not None else self

    def worker_status(self) -> WorkerStatus | None:
        """This process's worker (inline or child), or None if it has none."""
        if self.worker_process is not None:
            return self.worker_process.current_status()
        if self.worker is None:
            return None
        health = self.worker_health
        return worker_status(
            self.worker,
            alive=self.worker_alive,
            restarts=health.restarts if health else 0,
            last_error=health.last_error if health else None,
        )

    @property
    def worker_alive(self) -> bool:
        """The worker task runs (not dead, not waiting to be restarted)."""
        if self.worker_process is not None:
            return self.worker_process.alive
        return (
            self.worker_task is not None
            and not self.worker_task.done()
            and self.worker_health is not None
            and self.worker_health.running
        )

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keep a reference, log its failure."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
