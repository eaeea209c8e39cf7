"""``GET /metrics``: this host's process metrics plus gauges read from the shared database.

Who may scrape: anyone when no API key is configured (the usual Host-header guard still
applies); otherwise only an admin key (``Authorization: Bearer <key>``), because the
numbers cover every key's batches; ``metrics_public`` serves it without a key. With
``metrics_enabled`` off the route does not exist (404).

The API server adds the database gauges (batches by status, queue, deliveries); a
``vllm-batch worker --metrics-port`` endpoint serves only its host's process metrics
(``worker_metrics.py``), so scraping the API once and every other worker host once counts
everything once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.core import GaugeMetricFamily, Metric

from vllm_batch import __version__
from vllm_batch.api.worker_metrics import refusal
from vllm_batch.batches.states import BatchStatus, DeliveryKind, DeliveryStatus
from vllm_batch.batches.store import stats
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.config import Settings
from vllm_batch.observability import metrics
from vllm_batch.observability.exposition import render
from vllm_batch.storage.blob import read_status

log = logging.getLogger(__name__)
DB_TIMEOUT_SECONDS = 5.0
DELIVERY_KINDS = tuple(DeliveryKind)
OPEN_DELIVERY_STATUSES = (DeliveryStatus.PENDING, DeliveryStatus.FAILED)


async def database_families(ctx: StoreContext, models: Iterable[str]) -> list[Metric]:
    """Gauges from the shared database; only ``database_up 0`` if it does not answer."""
    up = GaugeMetricFamily(
        "vllm_batch_database_up", "1 if this scrape's database queries succeeded."
    )
    info = GaugeMetricFamily(
        "vllm_batch_build_info", "The server's version (always 1).", labels=["version"]
    )
    info.add_metric([__version__], 1)
    try:
        async with asyncio.timeout(DB_TIMEOUT_SECONDS), ctx.read_sessions() as session:
            by_status = await stats.batches_by_status(session)
            queue = await stats.queue_by_model(session, time.time())
            deliveries = await stats.open_deliveries(session)
    except Exception as exc:
        log.warning("metrics: database queries failed (%s)", exc.__class__.__name__)
        up.add_metric([], 0)
        return [up, info]
    up.add_metric([], 1)
    batches = GaugeMetricFamily("vllm_batch_batches", "Batches by status.", labels=["status"])
    for status in BatchStatus:
        batches.add_metric([status.value], by_status.get(status.value, 0))
    families: list[Metric] = [up, info, batches, *_queue_families(queue, models)]
    open_deliveries = GaugeMetricFamily(
        "vllm_batch_deliveries",
        "Deliveries waiting or retrying (pending) and given up (failed).",
        labels=["kind", "status"],
    )
    kinds = sorted({*map(str, DELIVERY_KINDS), *(kind for kind, _ in deliveries)})
    for kind in kinds:
        for state in OPEN_DELIVERY_STATUSES:
            open_deliveries.add_metric([kind, state], deliveries.get((kind, str(state)), 0))
    families.append(open_deliveries)
    return families


async def storage_families(ctx: StoreContext) -> list[Metric]:
    """``storage_ok`` (the ``/ready`` verdict) and, for local storage, its free bytes."""
    ok = GaugeMetricFamily(
        "vllm_batch_storage_ok",
        "1 if the file storage has room (free space above the minimum, no write refused lately).",
    )
    try:
        status = await anyio.to_thread.run_sync(
            read_status, ctx.storage, ctx.settings.storage_min_free_bytes
        )
    except Exception as exc:
        log.warning("metrics: storage check failed (%s)", exc.__class__.__name__)
        ok.add_metric([], 0)
        return [ok]
    ok.add_metric([], 1 if status.ok else 0)
    families: list[Metric] = [ok]
    if status.free_bytes is not None:
        free = GaugeMetricFamily(
            "vllm_batch_storage_free_bytes", "Free bytes on the local file storage's volume."
        )
        free.add_metric([], status.free_bytes)
        families.append(free)
    return families


def _queue_families(queue: dict[str, stats.ModelQueue], models: Iterable[str]) -> list[Metric]:
    def family(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"vllm_batch_{name}", doc, labels=["model", *extra])

    lines = family("queue_lines", "Lines still to run in in-progress batches.")
    batches = family("queue_batches", "In-progress batches with chunks still to run.")
    chunks = family("queue_chunks", "Unfinished chunks by status.", ("status",))
    oldest = family("queue_oldest_age_seconds", "Age of the oldest in-progress batch.")
    expired = family(
        "chunks_lease_expired", "Running chunks whose lease expired (to be taken over)."
    )
    for model in sorted({*models, *queue}):
        q = queue.get(model, stats.ModelQueue())
        lines.add_metric([model], q.lines)
        batches.add_metric([model], q.batches)
        chunks.add_metric([model, "queued"], q.queued_chunks)
        chunks.add_metric([model, "running"], q.running_chunks)
        oldest.add_metric([model], q.oldest_age)
        expired.add_metric([model], q.expired_leases)
    return [lines, batches, chunks, oldest, expired]


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Add ``GET /metrics`` to the API app (nothing if metrics are off)."""
    if not settings.metrics_enabled:
        return

    @app.get("/metrics", tags=["service"], include_in_schema=False)
    async def metrics_route(request: Request) -> Response:
        refused = refusal(request, settings, request.app.state.keys)
        if refused is not None:
            return refused
        ctx = request.app.state.ctx
        families = await database_families(ctx, settings.served_model_names)
        families += await storage_families(ctx)
        body, content_type = render(metrics.directory(), families, request.headers.get("accept"))
        return Response(body, media_type=content_type)
