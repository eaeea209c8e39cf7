"""Worker faults for real, on real worker and server subprocesses and the real (tiny) engine.

- a standalone worker is stopped gracefully (SIGTERM) in the middle of a chunk and started
  again, with ``max_chunk_attempts=1``: no line fails (a graceful stop is not charged as an
  attempt; ``tests/unit/test_graceful_restarts.py`` stops a worker ten times);
- the model's engine cannot load (corrupt ``config.json``): nothing fails, ``/ready`` is
  503 naming the engine; once the model is repaired the same server loads it and finishes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, create_pg_database, drop_pg_database
from tests.e2e.conftest import ServerProcess, spawn_server, stop_server
from tests.e2e.test_faults import (
    FAULT_ENV,
    assert_exactly_once,
    model_args,
    ready,
    submit,
    wait_ready_200,
)
from tests.engine_budget import budgeted_popen
from tests.helpers import wait_for_batch
from tests.paced import PACED_CLI, Gate

# ------------------------------------------------------------------ graceful restarts

RESTARTS = 1
LIFE_REQUESTS = 60
"""Requests each worker life may start: fewer than a chunk (200), so the stop interrupts
the chunk, which is then claimed again: more often than ``max_chunk_attempts`` (1) allows."""


def spawn_worker(
    model: Path, db_url: str, data_dir: Path, log_path: Path, gate: Gate
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return budgeted_popen(
            log_path.stem,
            [
                sys.executable,
                "-m",
                PACED_CLI,
                "worker",
                *model_args(model, db_url),
                "--max-num-seqs",
                "4",
                "--data-dir",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **FAULT_ENV, **gate.env, "VLLM_BATCH_MAX_CHUNK_ATTEMPTS": "1"},
        )


def test_graceful_worker_restarts_fail_no_line(tiny_model: Path, tmp_path: Path) -> None:
    rng = random.Random(int(time.time()))
    db_url = create_pg_database()
    data_dir = tmp_path / "data"
    gate = Gate(tmp_path / "gate")
    lines = 120  # one chunk: both worker lives run it
    api: ServerProcess | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        api = spawn_server(
            ["--no-worker", *model_args(tiny_model, db_url)],
            data_dir,
            # Chunks (made by the API) longer than a worker lives: each is interrupted
            # and resumed several times, more often than max_chunk_attempts.
            env={**FAULT_ENV, "VLLM_BATCH_CHUNK_SIZE": "200"},
            wait_engine=False,
        )
        client = OpenAI(base_url=api.base_url, api_key="x", max_retries=5)
        batch_id = submit(client, lines, max_tokens=16)
        stops = []
        for n in range(RESTARTS):
            log_path = data_dir / f"worker{n}.log"
            gate.allow(LIFE_REQUESTS)
            worker = spawn_worker(tiny_model, db_url, data_dir, log_path, gate)
            # Stopped mid-chunk: some requests done, some running, the rest held back.
            gate.wait_started(worker, rng.randint(LIFE_REQUESTS // 2, LIFE_REQUESTS), log_path)
            before = client.batches.retrieve(batch_id).request_counts
            assert before is not None
            os.kill(worker.pid, signal.SIGTERM)
            assert worker.wait(60) == 0, log_path.read_text()[-3000:]
            log = log_path.read_text(errors="replace")
            after = client.batches.retrieve(batch_id)
            assert after.status == "in_progress", f"batch ended before restart {n + 1}: {after}"
            assert after.request_counts is not None and after.request_counts.failed == 0, (
                f"restart {n + 1}: {after.request_counts} (worker log tail: {log[-2000:]})"
            )
            # (vLLM's own AsyncLLM.__del__ may print a traceback at interpreter exit.)
            assert "Traceback" not in log.split("unloading model")[0], log[-3000:]
            assert "ERROR vllm_batch" not in log, log[-3000:]
            stops.append((before.completed, after.request_counts.completed))
        gate.allow(None)
        worker = spawn_worker(tiny_model, db_url, data_dir, data_dir / "worker-final.log", gate)
        wait_for_batch(client, batch_id, timeout=600)
        assert_exactly_once(client, batch_id, lines)
        print("completed before/after each SIGTERM:", stops)
    finally:
        if worker is not None and worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if api is not None:
            stop_server(api)
        drop_pg_database(db_url)


# ------------------------------------------------------------------ engine cannot load


@pytest.fixture
def broken_model(tiny_model: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the tiny model whose ``config.json`` is not JSON."""
    model = tmp_path / "broken-model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], broken')
    yield model


def test_engine_that_cannot_load_fails_nothing_and_recovers(
    tiny_model: Path, broken_model: Path, tmp_path: Path
) -> None:
    lines = 100
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}"
    server = spawn_server(
        model_args(broken_model, db_url), tmp_path / "data", env=FAULT_ENV, wait_engine=False
    )
    try:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=5)
        batch_id = submit(client, lines)
        # Watch until the load failed twice (retried) and /ready reported it several times;
        # how long that takes depends on the machine, so the deadline is only a hang guard.
        deadline = time.monotonic() + 300
        seen_503 = 0
        while seen_503 < 5 or server.log().count(f"model {TINY_NAME} failed to load") < 2:
            assert time.monotonic() < deadline, (
                f"/ready reported the failed engine {seen_503} times in 300 s; "
                f"log: {server.log()[-3000:]}"
            )
            assert server.process.poll() is None, server.log()[-3000:]
            code, body = ready(server.url)
            batch = client.batches.retrieve(batch_id)
            assert batch.request_counts is not None and batch.request_counts.failed == 0, batch
            assert batch.error_file_id is None
            if "engine_failures" in body["worker"]:  # failed, or loading again after backoff
                assert code == 503, body
                assert TINY_NAME in body["reasons"]["worker"], body
                assert TINY_NAME in body["worker"]["engine_failures"], body
                seen_503 += 1
            time.sleep(1)
        batch = client.batches.retrieve(batch_id)
        assert batch.status == "in_progress", batch
        assert batch.request_counts is not None
        assert batch.request_counts.completed == 0 and batch.request_counts.failed == 0
        log = server.log()
        assert "took chunk" not in log, "a chunk was claimed for a model that cannot load"
        # Repair the model in place: the running server's next load retry succeeds.
        shutil.copy(tiny_model / "config.json", broken_model / "config.json")
        wait_for_batch(client, batch_id, timeout=400)
        assert_exactly_once(client, batch_id, lines)
        assert wait_ready_200(server.url)["worker"]["loaded_model"] == TINY_NAME
    finally:
        stop_server(server)
