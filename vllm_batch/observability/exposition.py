"""The Prometheus exposition of this host's process metrics plus families computed for a scrape.

Served by the API's ``/metrics`` (``api/prometheus.py``, with the database gauges) and by
``api/worker_metrics.py`` (a ``vllm-batch worker --metrics-port`` or ``vllm-batch run
--enable-metrics``: process metrics only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from vllm_batch.observability import metrics

log = logging.getLogger(__name__)


class _Families(Collector):
    """Metric families computed before the scrape (prometheus collectors are sync)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(
    directory: Path | None, families: Iterable[Metric], accept: str | None
) -> tuple[bytes, str]:
    """The exposition (text format, or OpenMetrics if ``accept`` asks) and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    if directory is not None:
        registry.register(metrics.ProcessCollector(directory))
    registry.register(_Families(families))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
