"""What runs beside the API, wired once for every kind of process.

``serve`` (its worker inline or in a child), ``vllm-batch worker`` and serve's worker child
all build their engines, their worker and their background services here, and stop them
the same way: set ``shutdown``, let the supervised tasks end, then cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from vllm_batch.batches.housekeeping import run_housekeeping
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.batches.validate import ValidationSweeper
from vllm_batch.config import Settings
from vllm_batch.deliveries.dispatcher import DeliveryDispatcher
from vllm_batch.engines import engine_factory
from vllm_batch.engines.manager import EngineFactory, EngineManager
from vllm_batch.observability.gpu import NvmlReader, ReadingsSource
from vllm_batch.observability.gpu_guard import GpuGuard
from vllm_batch.runtime.supervise import TaskHealth, supervise
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.loop import Worker

log = logging.getLogger(__name__)


class Services:
    """This process's supervised tasks: each restarted if it dies, all ended by ``shutdown``."""

    def __init__(self, shutdown: asyncio.Event) -> None:
        self.shutdown = shutdown
        self.health: list[TaskHealth] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> TaskHealth:
        """Run ``run()`` under supervision until ``shutdown``."""
        health = TaskHealth(name)
        self.health.append(health)
        self.tasks.append(asyncio.create_task(supervise(health, run, self.shutdown)))
        return health

    def add(self, task: asyncio.Task[Any]) -> None:
        """Stop ``task`` with the others (one that is not supervised)."""
        self.tasks.append(task)

    async def wait(self) -> None:
        """Until every task has ended (after ``shutdown``)."""
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel the tasks still running and wait for them."""
        for task in self.tasks:
            task.cancel()
        await self.wait()


def start_background(
    services: Services, store: StoreContext, *, validating: set[str] | None = None
) -> DeliveryDispatcher | None:
    """Housekeeping, the validation sweeper (where batches are validated: ``validating``)
    and, if enabled, the delivery dispatcher, which is returned."""
    shutdown = services.shutdown
    services.start("housekeeping", lambda: run_housekeeping(store, shutdown))
    if validating is not None:
        sweeper = ValidationSweeper(store, validating)
        services.start("validation sweeper", lambda: sweeper.run(shutdown))
    if not store.settings.deliveries:
        return None
    dispatcher = DeliveryDispatcher(store)
    services.start("deliveries", lambda: dispatcher.run(shutdown))
    return dispatcher


def make_engines(settings: Settings, factory: EngineFactory | None = None) -> EngineManager:
    """The engines of ``settings.model_specs``, built by ``factory`` (default: the engine
    ``settings.engine`` names)."""
    return EngineManager(settings.model_specs, factory or engine_factory(settings))


def make_worker(
    store: StoreContext, engines: EngineManager, gpu_source: ReadingsSource | None = None
) -> Worker:
    """A worker on ``store`` and ``engines``, paused by the GPU guard (readings from
    ``gpu_source``, default NVML)."""
    guard = GpuGuard(gpu_source or NvmlReader(), store.settings)
    return Worker(WorkerContext(**store.shared(), engines=engines), gpu=guard)


async def stop_worker(task: asyncio.Task[None] | None, grace: float) -> None:
    """Wait up to ``grace`` seconds for the worker's task (after ``shutdown``)."""
    if task is None:
        return
    try:
        await asyncio.wait_for(task, grace)
    except Exception:
        log.exception("worker did not stop cleanly")


@contextlib.asynccontextmanager
async def preloading(engines: EngineManager) -> AsyncIterator[EngineManager]:
    """Load the first model in the background while the body runs (opening the store);
    the engines are closed on the way out."""
    preload = asyncio.create_task(engines.preload())
    try:
        yield engines
    finally:
        engines.abort_loading()
        preload.cancel()
        await asyncio.gather(preload, return_exceptions=True)
        await engines.close()
