"""The FastAPI app factory; the lifespan owns the database, storage, worker and engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from vllm_batch import __version__
from vllm_batch.api import batches, files, info
from vllm_batch.api.deps import require_api_key
from vllm_batch.api.errors import error_response, install_error_handlers
from vllm_batch.api.state import AppContext
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import make_engine
from vllm_batch.engines.base import Engine
from vllm_batch.engines.manager import EngineFactory, EngineManager
from vllm_batch.service.housekeeping import run_housekeeping
from vllm_batch.service.supervise import TaskHealth, supervise
from vllm_batch.service.validate import ValidationSweeper
from vllm_batch.worker.context import WorkerContext, open_store
from vllm_batch.worker.loop import Worker

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_SECONDS = 30.0
UPLOAD_OVERHEAD_BYTES = 64 * 1024


def create_app(settings: Settings, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. The worker (if enabled) uses ``engine_factory``; default is vLLM."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_store(settings) as store:
            ctx = AppContext(**store.shared())
            app.state.ctx = ctx
            shutdown = asyncio.Event()
            if settings.worker:
                ctx.engines = EngineManager(
                    settings.model_specs, engine_factory or settings_engine_factory(settings)
                )
                worker = Worker(WorkerContext(**ctx.shared(), engines=ctx.engines))
                ctx.worker = worker
                ctx.worker_health = TaskHealth("worker")
                ctx.worker_task = asyncio.create_task(
                    supervise(ctx.worker_health, lambda: worker.run(shutdown), shutdown)
                )
            sweeper = ValidationSweeper(ctx, ctx.validating)
            for name, run in (
                ("housekeeping", lambda: run_housekeeping(ctx, shutdown)),
                ("validation sweeper", lambda: sweeper.run(shutdown)),
            ):
                health = TaskHealth(name)
                ctx.services.append(health)
                ctx.spawn(supervise(health, run, shutdown))
            try:
                yield
            finally:
                shutdown.set()
                ctx.notifier.wake()
                if ctx.worker_task is not None:
                    try:
                        await asyncio.wait_for(ctx.worker_task, SHUTDOWN_GRACE_SECONDS)
                    except Exception:
                        log.exception("worker did not stop cleanly")
                if ctx.engines is not None:
                    await ctx.engines.close()
                for task in list(ctx.background):
                    task.cancel()
                await asyncio.gather(*ctx.background, return_exceptions=True)

    app = FastAPI(title="vLLM Batch Server", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    v1 = [Depends(require_api_key)]
    app.include_router(files.router, prefix="/v1", dependencies=v1)
    app.include_router(batches.router, prefix="/v1", dependencies=v1)
    app.include_router(info.v1_router, prefix="/v1", dependencies=v1)
    app.include_router(info.router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )

    @app.middleware("http")
    async def request_id_and_upload_limit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        length = request.headers.get("content-length")
        if (
            request.method == "POST"
            and request.url.path == "/v1/files"
            and length
            and length.isdigit()
            and int(length) > settings.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
        ):
            response: Response = error_response(
                413,
                f"File is too large: the limit is {settings.max_upload_bytes} bytes.",
                "file",
                "file_too_large",
            )
        else:
            response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        return response

    return app


def settings_engine_factory(settings: Settings) -> EngineFactory:
    """The engine for ``settings.engine``: real vLLM (imported lazily) unless benchmarking."""

    def factory(spec: ModelSpec) -> Engine:
        return make_engine(spec, settings)

    return factory
