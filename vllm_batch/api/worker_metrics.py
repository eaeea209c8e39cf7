"""Who may scrape ``/metrics``, and the bare metrics app a worker or ``vllm-batch run`` serves.

No database here: ``vllm-batch worker --metrics-port`` and ``vllm-batch run
--enable-metrics`` serve ``worker_metrics_app``, this host's (or this run's) process
metrics only; the API's ``/metrics`` (``prometheus.py``) adds the database gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from fastapi import FastAPI, Request
from fastapi.responses import Response

from vllm_batch.api.auth import KeyRing
from vllm_batch.api.errors import error_response
from vllm_batch.config import Settings
from vllm_batch.observability import metrics
from vllm_batch.observability.exposition import render

log = logging.getLogger(__name__)


def refusal(request: Request, settings: Settings, keys: KeyRing) -> Response | None:
    """Why this caller may not scrape (401/403), or None if it may."""
    if settings.metrics_public or not keys.enabled:
        return None
    header = request.headers.get("authorization")
    principal = keys.resolve(header.encode("latin-1", "replace") if header else None)
    if principal is None:
        return error_response(
            401,
            "Incorrect API key provided. Pass an admin key as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    if not principal.admin:
        return error_response(
            403, "/metrics needs an admin API key.", code="insufficient_permissions"
        )
    return None


def worker_metrics_app(settings: Settings) -> FastAPI:
    """The app a ``vllm-batch worker --metrics-port`` serves: ``/metrics`` (process side)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    keys = KeyRing.from_settings(settings)

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        refused = refusal(request, settings, keys)
        if refused is not None:
            return refused
        body, content_type = render(metrics.directory(), [], request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app


def bind_worker_metrics(settings: Settings) -> socket.socket:
    """The listening socket for ``metrics_host:metrics_port`` (raises ``OSError`` at once)."""
    assert settings.metrics_port is not None
    host = settings.metrics_host or settings.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, settings.metrics_port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def serve_worker_metrics(
    settings: Settings, sock: socket.socket, shutdown: asyncio.Event
) -> None:
    """Serve ``worker_metrics_app`` on ``sock`` until ``shutdown``."""
    import uvicorn

    from vllm_batch.api.connections import server_config

    app = worker_metrics_app(settings)
    server = uvicorn.Server(server_config(app, settings, log_level="warning", lifespan="off"))
    # The worker handles SIGTERM/SIGINT itself; uvicorn must not take them over.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    host, port = sock.getsockname()[:2]
    log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        await shutdown.wait()
    finally:
        server.should_exit = True
        await task
