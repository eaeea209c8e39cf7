"""The FastAPI app factory; the lifespan owns the database, storage, worker and engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI

from vllm_batch import __version__
from vllm_batch.api import batch_routes as batches
from vllm_batch.api import file_routes as files
from vllm_batch.api import info
from vllm_batch.api import upload_routes as uploads
from vllm_batch.api.deps import current_principal
from vllm_batch.api.edge import install_edge
from vllm_batch.api.errors import install_error_handlers
from vllm_batch.api.prometheus import install_metrics
from vllm_batch.api.state import AppContext
from vllm_batch.api.web import data as dashboard_data
from vllm_batch.api.web.history_sampler import run_history
from vllm_batch.api.web.pages import install_pages
from vllm_batch.batches.store_context import open_pool, open_store
from vllm_batch.config import Settings
from vllm_batch.engines.manager import EngineFactory, EngineManager
from vllm_batch.observability import metrics
from vllm_batch.observability.gpu import ReadingsSource
from vllm_batch.observability.history import History
from vllm_batch.observability.loop_lag import watch_loop_lag
from vllm_batch.runtime.process import (
    Services,
    make_engines,
    make_worker,
    preloading,
    start_background,
    stop_worker,
)
from vllm_batch.runtime.supervise import TaskHealth, supervise
from vllm_batch.runtime.worker_process import WorkerProcess

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_SECONDS = 30.0


def create_app(
    settings: Settings,
    engine_factory: EngineFactory | None = None,
    gpu_source: ReadingsSource | None = None,
) -> FastAPI:
    """Build the app. The worker (if enabled) uses ``engine_factory`` (default: vLLM) and
    reads its GPUs from ``gpu_source`` (default: NVML)."""
    warn_ignored_environment()
    _ = settings.lora_specs  # a bad LoRA spec fails here, not when the first batch arrives
    # A worker process makes its own engine: a given factory (tests) keeps the worker inline.
    child_worker = settings.worker and settings.worker_mode == "process" and not engine_factory

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.configure(settings)
        async with contextlib.AsyncExitStack() as stack:
            engines: EngineManager | None = None
            if settings.worker and not child_worker:
                # The worker's first model loads while the database migrates and the app
                # starts; the engines are closed last, also when the store never opened.
                engines = await stack.enter_async_context(
                    preloading(make_engines(settings, engine_factory))
                )
            async with serving(app, engines):
                yield

    @contextlib.asynccontextmanager
    async def serving(app: FastAPI, engines: EngineManager | None) -> AsyncIterator[None]:
        """The store, the worker (with ``engines``) and the services, stopped in order."""
        # Two connection pools: background work (worker, services) and API requests.
        async with open_store(settings, "worker") as store, open_pool(settings, "api") as api:
            ctx = AppContext(**{**store.shared(), **api.context_fields()}, work_store=store)
            app.state.ctx = ctx
            shutdown = asyncio.Event()
            services = Services(shutdown)
            if engines is not None:
                ctx.engines = engines
                worker = ctx.worker = make_worker(store, engines, gpu_source)
                ctx.worker_health = TaskHealth("worker")
                ctx.worker_task = asyncio.create_task(
                    supervise(ctx.worker_health, lambda: worker.run(shutdown), shutdown)
                )
            if child_worker:
                child = ctx.worker_process = WorkerProcess(settings)
                ctx.worker_health = child.health
                ctx.worker_task = asyncio.create_task(
                    supervise(child.health, lambda: child.run(shutdown), shutdown)
                )
                store.notifier.forward(child.wake)
            ctx.dispatcher = start_background(services, store, validating=ctx.validating)
            ctx.services = services.health
            services.add(asyncio.create_task(watch_loop_lag(shutdown)))
            ctx.history = History(settings.dashboard_history_interval)
            services.add(asyncio.create_task(run_history(ctx.history, ctx.for_work, shutdown)))
            try:
                yield
            finally:
                shutdown.set()
                ctx.notifier.wake()
                if ctx.engines is not None:
                    ctx.engines.abort_loading()  # a load under way would delay the exit
                if ctx.worker_process is not None:
                    await ctx.worker_process.stop(SHUTDOWN_GRACE_SECONDS)
                await stop_worker(ctx.worker_task, SHUTDOWN_GRACE_SECONDS)
                if ctx.engines is not None:
                    await ctx.engines.close()
                await services.cancel()
                for task in list(ctx.background):
                    task.cancel()
                await asyncio.gather(*ctx.background, return_exceptions=True)

    docs = settings.docs_enabled
    app = FastAPI(
        title="vLLM Batch Server",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # /docs: the vendored Swagger UI (install_pages), not the CDN's
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    v1 = [Depends(current_principal)]
    app.include_router(files.router, prefix="/v1", dependencies=v1)
    app.include_router(uploads.router, prefix="/v1", dependencies=v1)
    app.include_router(batches.router, prefix="/v1", dependencies=v1)
    app.include_router(info.v1_router, prefix="/v1", dependencies=v1)
    app.include_router(dashboard_data.router, prefix="/v1", dependencies=v1)
    app.include_router(info.router)
    install_pages(app, docs=docs)
    declare_bearer_auth(app)
    install_metrics(app, settings)
    install_edge(app, settings)
    return app


def declare_bearer_auth(app: FastAPI) -> None:
    """Publish the API key in the OpenAPI schema: a ``bearerAuth`` scheme that every ``/v1``
    operation requires, so ``/docs`` can send it. Only the schema changes: the edge still
    checks keys (and answers 401 in OpenAI's error shape) exactly as before."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer <key>`.",
                }
            }
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
                        operation.setdefault("responses", {}).setdefault(
                            "401", {"description": "No API key, or a wrong one."}
                        )
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


IGNORED_ENVIRONMENT = {
    "GRAFANA_ENABLED": "Grafana is not part of the server: run it with "
    "`docker compose --profile monitoring` (docs/deployment.md, Docker Compose)",
}


def warn_ignored_environment() -> None:
    """Say so when a variable older setups used is set but means nothing to the server."""
    for name, advice in IGNORED_ENVIRONMENT.items():
        if name in os.environ:
            log.warning("%s is set but not a server setting: %s", name, advice)
