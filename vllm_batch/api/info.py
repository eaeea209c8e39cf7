"""Service routes: ``/`` (info), ``/health``, ``/ready`` and ``/v1/models``.

``/`` answers JSON to API clients and ``curl``; a browser (``Accept`` ranking ``text/html``
above JSON) is redirected to the dashboard.

``/`` and ``/ready`` need no API key, so without a valid one they show states and counts
only; ids (worker, chunk, batch) and error texts only with an admin key in
``Authorization: Bearer <key>`` (and never when no key is configured: then nobody is
authenticated). Batch counts on ``/`` are the caller's own with a non-admin key, and
hidden from callers without a key when keys are configured.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from vllm_batch import __version__
from vllm_batch.api.auth import KeyRing, Principal
from vllm_batch.api.deps import CtxDep
from vllm_batch.api.probes import (
    check_database,
    check_gpu,
    check_services,
    check_storage,
    check_worker,
)
from vllm_batch.api.web.pages import DASHBOARD, prefers_html
from vllm_batch.batches.store import outbox, queries

router = APIRouter(tags=["service"])
v1_router = APIRouter(tags=["models"])


def caller(request: Request) -> Principal | None:
    """The principal of a valid key on this request; None without one (or with no keys)."""
    keys: KeyRing = request.app.state.keys
    if not keys.enabled:
        return None
    header = request.headers.get("authorization")
    return keys.resolve(header.encode("latin-1", "replace") if header else None)


def has_admin_key(request: Request) -> bool:
    principal = caller(request)
    return principal is not None and principal.admin


@router.get("/", response_model=None)
async def service_info(
    ctx: CtxDep, request: Request, response: Response
) -> dict[str, Any] | RedirectResponse:
    """Service info as JSON; a browser (``Accept`` preferring HTML) goes to the dashboard."""
    response.headers["Vary"] = "Accept"
    if prefers_html(request.headers.get("accept", "")):
        return RedirectResponse(DASHBOARD, status_code=307, headers={"Vary": "Accept"})
    principal = caller(request)
    details = principal is not None and principal.admin
    show_batches = principal is not None or not request.app.state.keys.enabled
    worker = check_worker(ctx)
    counts: dict[str, Any]
    try:
        async with ctx.read_sessions() as session:
            counts = {
                "batches": (
                    await queries.count_batches_by_status(
                        session, owner=principal.scope if principal else None
                    )
                    if show_batches
                    else None
                ),
                "chunks": await queries.queue_depth(session),
                "deliveries": (
                    await outbox.counts(session, owner=principal.scope if principal else None)
                    if show_batches
                    else None
                ),
            }
    except Exception as exc:  # the page still answers while the database is down
        counts = {
            "batches": None,
            "chunks": None,
            "deliveries": None,
            "database": exc.__class__.__name__,
        }
    return {
        "name": "vLLM Batch Server",
        "version": __version__,
        "models": ctx.settings.served_model_names,
        **counts,
        "worker": {**worker.state, **worker.details} if details else worker.state,
        "gpu": check_gpu(ctx).state,
        "handlers": {
            "webhooks": ctx.deliveries.webhooks,
            "server_webhook_urls": len(ctx.deliveries.webhook_urls),
            "result_handlers": sorted(ctx.deliveries.handlers),
        },
        "links": {
            "openai_base_url": "/v1",
            "files": "/v1/files",
            "batches": "/v1/batches",
            "models": "/v1/models",
            "health": "/health",
            "ready": "/ready",
            "dashboard": DASHBOARD,
            "docs": "/docs" if ctx.settings.docs_enabled else None,
        },
    }


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(ctx: CtxDep, request: Request) -> JSONResponse:
    """200 if the database answers, the worker runs and its engine loads, and the file
    storage has room; else 503.

    ``gpu`` shows GPU readings and whether the GPU guard pauses claims (never a 503).
    """
    details = has_admin_key(request)
    checks = {
        "database": await check_database(ctx),
        "worker": check_worker(ctx),
        "services": check_services(ctx),
        "storage": await check_storage(ctx),
        "gpu": check_gpu(ctx),
    }
    ok = all(check.ok for check in checks.values())
    database = checks["database"]
    body: dict[str, Any] = {
        "status": "ready" if ok else "not_ready",
        "database": "ok" if database.ok else "unavailable",
        "worker": checks["worker"].state,
        "services": checks["services"].state,
        "storage": checks["storage"].state,
        "gpu": checks["gpu"].state,
        "reasons": {name: check.reason for name, check in checks.items() if not check.ok},
    }
    if details:
        body["details"] = {name: check.details for name, check in checks.items()}
    return JSONResponse(body, status_code=200 if ok else 503)


@v1_router.get("/models")
async def list_models(ctx: CtxDep) -> dict[str, Any]:
    """Served models with their kind, then LoRA adapters with their base model in
    ``parent`` (as vLLM)."""
    models = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "vllm-batch",
            "kind": kind.value if kind is not None else None,
        }
        for name, kind in ctx.settings.model_kinds.items()
    ]
    adapters = [
        {"id": a.name, "object": "model", "created": 0, "owned_by": "vllm-batch", "parent": a.base}
        for a in ctx.settings.lora_specs
    ]
    return {"object": "list", "data": models + adapters}
