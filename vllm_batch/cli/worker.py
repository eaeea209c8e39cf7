"""``vllm-batch worker``: a worker without the API (scale-out: many workers, one database)."""

from __future__ import annotations

import asyncio

from vllm_batch.cli import options as o
from vllm_batch.cli.build import engine_settings, setup_logging
from vllm_batch.config import Settings

WORKER_FLAGS = (*o.STORE_FLAGS, *o.ENGINE_FLAGS, o.METRICS_PORT, o.METRICS_HOST)


@o.command(*WORKER_FLAGS)
def worker(given: o.Given) -> None:
    """Run a worker without the API (scale-out: many workers, one database)."""
    settings = engine_settings(given)
    setup_logging(settings)
    asyncio.run(run_worker(settings))


async def run_worker(settings: Settings) -> None:
    """The worker, housekeeping, deliveries and (with --metrics-port) metrics until a signal."""
    from vllm_batch.api.worker_metrics import bind_worker_metrics, serve_worker_metrics
    from vllm_batch.batches.store_context import open_store
    from vllm_batch.observability import metrics
    from vllm_batch.runtime.process import Services, make_engines, make_worker, start_background
    from vllm_batch.runtime.signals import stop_on_signals
    from vllm_batch.runtime.supervise import TaskHealth, supervise

    metrics.configure(settings)
    metrics_socket = None
    if settings.metrics_enabled and settings.metrics_port is not None:
        try:
            metrics_socket = bind_worker_metrics(settings)
        except OSError as exc:
            message = f"cannot serve metrics on port {settings.metrics_port}: {exc}"
            raise SystemExit(message) from None
    async with open_store(settings) as store:
        engines = make_engines(settings)
        worker = make_worker(store, engines)
        shutdown = asyncio.Event()
        stop_on_signals(worker.ctx, shutdown)
        services = Services(shutdown)
        start_background(services, store)
        if metrics_socket is not None:
            services.add(
                asyncio.create_task(serve_worker_metrics(settings, metrics_socket, shutdown))
            )
        try:
            await supervise(TaskHealth("worker"), lambda: worker.run(shutdown), shutdown)
            await services.wait()
        finally:
            await services.cancel()
            await engines.close()
