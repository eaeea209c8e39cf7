"""``vllm-batch run --enable-metrics``: Prometheus ``/metrics`` while the run lasts.

As with ``vllm run-batch --enable-metrics --host H --port P``, the endpoint is up from
before the engine starts until the output is published. It serves the process metrics a
worker records (``observability.metrics``: lines, tokens, latency, engine loaded, vLLM's
scheduler gauges) with the worker's metrics app (``observability.exposition``). The
multiprocess files go to a temporary directory, removed at the end, unless
``VLLM_BATCH_METRICS_DIR`` (or ``PROMETHEUS_MULTIPROC_DIR``) names one.

A run without the flag records nothing: the process may host other recorders (tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from vllm_batch.api.worker_metrics import bind_worker_metrics, serve_worker_metrics
from vllm_batch.config import Settings
from vllm_batch.observability import metrics
from vllm_batch.pipeline.line_result import LineResult


class MetricsUnavailable(Exception):
    """The ``/metrics`` address cannot be bound."""


@dataclass(frozen=True)
class MetricsAddress:
    """Where ``/metrics`` is served: ``--host`` and ``--port``."""

    host: str
    port: int


class RunMetrics:
    """What a run records; every call is a no-op unless the run serves ``/metrics``."""

    def __init__(self, model: str, recording: bool) -> None:
        self.model = model
        self.recording = recording

    def line(self, result: LineResult) -> None:
        if self.recording:
            metrics.lines_saved(self.model, (result,))

    def engine_started(self) -> None:
        if self.recording:
            metrics.engine_loaded(self.model)

    def engine_stopped(self) -> None:
        if self.recording:
            metrics.engine_unloaded(self.model)


@contextlib.asynccontextmanager
async def run_metrics(
    address: MetricsAddress | None, settings: Settings, model: str
) -> AsyncIterator[RunMetrics]:
    """Serve ``/metrics`` at ``address`` for the block (None: record and serve nothing).

    Raises ``MetricsUnavailable`` at once if the address cannot be bound.
    """
    if address is None:
        yield RunMetrics(model, recording=False)
        return
    with tempfile.TemporaryDirectory(prefix="vllm_batch_run_metrics_") as scratch:
        served = settings.model_copy(
            update={
                "metrics_enabled": True,
                "metrics_dir": settings.metrics_dir or Path(scratch),
                "metrics_host": address.host,
                "metrics_port": address.port,
                "models": [model],
            }
        )
        try:
            sock = bind_worker_metrics(served)
        except OSError as exc:
            where = f"{address.host}:{address.port}"
            raise MetricsUnavailable(f"cannot serve metrics on {where}: {exc}") from exc
        metrics.configure(served)
        shutdown = asyncio.Event()
        server = asyncio.create_task(serve_worker_metrics(served, sock, shutdown))
        try:
            yield RunMetrics(model, recording=True)
        finally:
            shutdown.set()
            await server
