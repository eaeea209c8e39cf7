"""Service routes: ``/`` (info), ``/health``, ``/ready`` and ``/v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from vllm_batch import __version__
from vllm_batch.api.deps import CtxDep, SessionDep
from vllm_batch.store import queries

router = APIRouter(tags=["service"])
v1_router = APIRouter(tags=["models"])


def worker_state(ctx: CtxDep) -> dict[str, Any]:
    if ctx.worker is None or ctx.engines is None:
        return {"enabled": False}
    return {
        "enabled": True,
        "id": ctx.worker.ctx.worker_id,
        "engine": ctx.engines.state,
        "loaded_model": ctx.engines.loaded_model,
        "current_chunk": ctx.worker.current_chunk,
        "chunks_done": ctx.worker.chunks_done,
    }


@router.get("/")
async def service_info(ctx: CtxDep, session: SessionDep) -> dict[str, Any]:
    return {
        "name": "vLLM Batch Server",
        "version": __version__,
        "models": ctx.settings.served_model_names,
        "batches": await queries.count_batches_by_status(session),
        "chunks": await queries.queue_depth(session),
        "worker": worker_state(ctx),
        "links": {
            "openai_base_url": "/v1",
            "files": "/v1/files",
            "batches": "/v1/batches",
            "models": "/v1/models",
            "health": "/health",
            "ready": "/ready",
            "docs": "/docs",
        },
    }


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(ctx: CtxDep, session: SessionDep) -> JSONResponse:
    try:
        await session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # report, don't raise: this is a probe
        database = f"error: {exc.__class__.__name__}"
    body = {"database": database, "worker": worker_state(ctx)}
    body["status"] = "ready" if database == "ok" else "not_ready"
    return JSONResponse(body, status_code=200 if database == "ok" else 503)


@v1_router.get("/models")
async def list_models(ctx: CtxDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "vllm-batch"}
            for name in ctx.settings.served_model_names
        ],
    }
