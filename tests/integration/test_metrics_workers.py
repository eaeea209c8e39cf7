"""Scale-out: an API server (no worker) and two ``vllm-batch worker`` processes on one
PostgreSQL database and one host. The API's ``/metrics`` sums the workers' counters, a
worker's ``--metrics-port`` serves the host's process metrics (no database gauges), and
a killed worker's counters stay while its live gauges go.

The workers use the benchmark engine (no inference): this is about the metrics plumbing;
the vLLM engine path is covered in ``test_metrics_engine.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    LiveServer,
    LoopThread,
    create_pg_database,
    drop_pg_database,
    free_port,
    start_server,
)
from tests.helpers import chat_line, jsonl, wait_for_batch
from tests.metrics_helpers import Scrape, scrape
from vllm_batch.config import Settings
from vllm_batch.observability import metrics

MODEL = "bench"
LINES = 60


def spawn_worker(db_url: str, data_dir: Path, name: str, *extra: str) -> subprocess.Popen[bytes]:
    log = open(data_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    directory = metrics.directory()
    assert directory is not None
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm_batch.cli",
            "worker",
            "--engine",
            "instant-benchmark",
            "--model",
            f"{MODEL}=/unused",
            "--database-url",
            db_url,
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
            "VLLM_BATCH_POLL_INTERVAL": "0.2",
        },
    )


@pytest.fixture
def api(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[LiveServer, str]]:
    db_url = create_pg_database()
    settings = Settings(
        models=[f"{MODEL}=/unused"],
        engine="instant-benchmark",
        worker=False,
        database_url=db_url,
        data_dir=tmp_path,
        chunk_size=10,
    )
    try:
        with contextlib.contextmanager(start_server)(loop_thread, settings, None) as server:
            yield server, db_url
    finally:
        drop_pg_database(db_url)


def wait_metrics(url: str, deadline: float) -> Scrape:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            return scrape(url)
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.2)


def test_api_sums_worker_processes(api: tuple[LiveServer, str], tmp_path: Path) -> None:
    server, db_url = api
    port = free_port()
    url = f"{server.url}/metrics"
    before = scrape(url)
    workers = [
        spawn_worker(db_url, tmp_path, "w1", "--metrics-port", str(port)),
        spawn_worker(db_url, tmp_path, "w2"),
    ]
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        upload = client.files.create(
            file=("in.jsonl", jsonl([chat_line(i, MODEL) for i in range(LINES)])), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert wait_for_batch(client, batch.id, timeout=120).status == "completed"
        after = scrape(url)

        def delta(name: str, **labels: str) -> float:
            return after.get(name, **labels) - before.get(name, **labels)

        assert delta("vllm_batch_lines_completed_total", model=MODEL) == LINES
        assert delta("vllm_batch_request_latency_seconds_count", model=MODEL) == LINES
        assert delta("vllm_batch_tokens_total", model=MODEL, kind="input") == 10 * LINES
        assert delta("vllm_batch_tokens_total", model=MODEL, kind="output") == LINES
        assert delta("vllm_batch_chunk_claims_total", model=MODEL) >= LINES // 10
        assert delta("vllm_batch_chunks_done_total", model=MODEL) == LINES // 10
        duration = "vllm_batch_batch_duration_seconds_count"
        assert delta(duration, model=MODEL, status="completed") == 1
        # Both workers may try to finalize it: its phases are observed once in all.
        for phase in ("validation", "queue", "run", "finalize"):
            assert delta("vllm_batch_batch_phase_seconds_count", model=MODEL, phase=phase) == 1
        # Both workers count once each has loaded its engine (a slow start may finish later
        # than this small batch).
        deadline = time.monotonic() + 60
        while scrape(url).get("vllm_batch_engine_loaded", model=MODEL) != 2:
            assert time.monotonic() < deadline, scrape(url).get("vllm_batch_engine_loaded")
            time.sleep(0.2)
        assert after.get("vllm_batch_batches", status="completed") == 1
        assert after.get("vllm_batch_queue_lines", model=MODEL) == 0
        assert after.get("vllm_batch_queue_batches", model=MODEL) == 0

        # A worker's own endpoint: the same host totals, no database gauges.
        own = wait_metrics(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 30)
        assert own.get("vllm_batch_lines_completed_total", model=MODEL) == after.get(
            "vllm_batch_lines_completed_total", model=MODEL
        )
        assert own.value("vllm_batch_batches", status="completed") is None

        # SIGKILL one worker, stop the other: counters stay, live gauges go.
        os.killpg(workers[1].pid, signal.SIGKILL)
        workers[1].wait(30)
        assert scrape(url).get("vllm_batch_engine_loaded", model=MODEL) == 1
        workers[0].send_signal(signal.SIGTERM)
        assert workers[0].wait(60) == 0
        last = scrape(url)
        assert last.get("vllm_batch_engine_loaded", model=MODEL) == 0
        assert last.get("vllm_batch_lines_completed_total", model=MODEL) == after.get(
            "vllm_batch_lines_completed_total", model=MODEL
        )
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(30)


def test_worker_metrics_port_in_use_stops_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = subprocess.run(
            [
                sys.executable,
                "-m",
                "vllm_batch.cli",
                "worker",
                "--engine",
                "instant-benchmark",
                "--model",
                f"{MODEL}=/unused",
                "--data-dir",
                str(tmp_path),
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
        )
    assert worker.returncode != 0
    assert f"cannot serve metrics on port {port}" in worker.stderr.decode()
