"""Every metric the Grafana dashboard queries is exported by a running server.

A live server (PostgreSQL, in-process worker on the session's tiny engine, a webhook
receiver) runs a small batch with one failing line, so that line, token, latency, chunk,
engine and delivery metrics all have samples; GPU readings are injected (no GPU here), as
the GPU guard's own tests do. Then ``/metrics`` is scraped and compared with the names
extracted from every PromQL expression of the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    TINY_NAME,
    LiveServer,
    LoopThread,
    database,
    engine_settings,
    start_server,
)
from tests.deploy.deployfiles import DASHBOARD
from tests.deploy.promql import dashboard_queries, exported_names, metric_names
from tests.helpers import chat_line, jsonl, wait_for_batch
from tests.webhook_receiver import Receiver, webhook_receiver

RECEIVER_HOST = "127.0.0.2"


@pytest.fixture(scope="module")
def live(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LiveServer, Receiver]]:
    data = tmp_path_factory.mktemp("dashboard-data")
    with webhook_receiver(RECEIVER_HOST) as receiver, database("postgresql", data / "x") as url:
        settings = engine_settings(
            tiny_model,
            database_url=url,
            data_dir=data,
            chunk_size=3,
            webhook_urls=[receiver.script("/hook", 200)],
            webhook_allowed_hosts=[RECEIVER_HOST],
            delivery_poll_interval=0.2,
        )
        for server in start_server(loop_thread, settings, tiny_engine):
            yield server, receiver


def _inject_gpu_readings() -> None:
    """One GPU's readings, set the way the worker's GPU guard sets them from NVML."""
    from vllm_batch.observability.gpu import GpuReading, GpuReadings, export_readings

    gpu = GpuReading(
        index=0,
        name="injected",
        utilization_percent=55.0,
        memory_used_bytes=3 * 2**30,
        memory_total_bytes=24 * 2**30,
        temperature_celsius=61.0,
        power_watts=180.0,
        power_limit_watts=300.0,
        throttle_reasons=("sw_power_cap",),
    )
    export_readings(GpuReadings(available=True, gpus=(gpu,)))


def test_every_dashboard_metric_is_exported(live: tuple[LiveServer, Receiver]) -> None:
    server, receiver = live
    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    lines = [chat_line(i, TINY_NAME) for i in range(7)]
    lines[3] = chat_line(3, TINY_NAME, temperature=-3)  # an error line: lines_failed
    upload = client.files.create(file=("dash.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(client, batch.id, timeout=120)
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.failed == 1
    receiver.wait_for("/hook", 1, timeout=30)  # a delivery attempt was made and recorded
    _inject_gpu_readings()

    queried: dict[str, set[str]] = {}
    for title, expr in dashboard_queries(DASHBOARD):
        for name in metric_names(expr):
            queried.setdefault(name, set()).add(title)
    assert len(queried) >= 40

    missing: dict[str, set[str]] = queried
    deadline = time.monotonic() + 15  # rates and delivery outcomes land within a flush
    while missing and time.monotonic() < deadline:
        response = httpx.get(f"{server.url}/metrics", timeout=10)
        assert response.status_code == 200, response.text[:300]
        assert response.headers["content-type"].startswith("text/plain")
        exported = exported_names(response.text)
        missing = {name: titles for name, titles in queried.items() if name not in exported}
        time.sleep(0.5)
    report = "\n".join(f"  {name}  (panels: {sorted(p)})" for name, p in sorted(missing.items()))
    assert not missing, f"dashboard queries metrics the server does not export:\n{report}"
