"""The Ray executor on a real local Ray cluster, with the real vLLM engine on the tiny model.

- a ``vllm-batch worker --executor ray`` serves the API's batches (openai SDK: upload,
  create, poll, download);
- its replica's process is killed (SIGKILL) mid-batch (the worker's engine is paced by a
  ``tests.paced`` gate, so the batch cannot end before the kill): Ray restarts it, the
  requests it held are sent again, and every line comes out exactly once, with the answers of the
  engine run in-process (the session's ``tiny_engine``, the engine ``vllm-batch run`` uses;
  tests/e2e/test_run_command.py runs that command);
- ``vllm-batch run --executor ray`` writes those same answers.

Engine starts dominate (25-60 s each here): the run and the worker start together, and the
run finishes while the worker's tests go on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LoopThread, create_pg_database, drop_pg_database
from tests.e2e.conftest import (
    RAY_LOCAL_ENV,
    Launched,
    RayCluster,
    ServerProcess,
    ray_args,
    spawn_server,
    stop_server,
)
from tests.e2e.test_faults import assert_exactly_once, attempts_used
from tests.e2e.test_run_command import ENGINE_FLAGS, parse
from tests.engine_budget import budgeted_popen
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.paced import PACED_CLI, Gate

COUNT = 160
MAX_TOKENS = 24
ENV = {
    **os.environ,
    **RAY_LOCAL_ENV,
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
WORKER_ENV = {"VLLM_BATCH_FLUSH_INTERVAL": "0.2", "VLLM_BATCH_CHUNK_SIZE": "100"}
REPLICA_READY = re.compile(r"Ray replicas ready for \S+: pid (\d+)")


def requests() -> list[dict[str, Any]]:
    """Greedy chat requests that run to ``MAX_TOKENS`` (the tiny model never stops early)."""
    return [chat_line(i, TINY_NAME, max_tokens=MAX_TOKENS) for i in range(COUNT)]


def launch(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cli: str = "vllm_batch.cli"
) -> Launched:
    with open(log_path, "ab") as log:
        process = budgeted_popen(
            args[0],
            [sys.executable, "-m", cli, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**ENV, **(env or {})},
        )
    return Launched(process, log_path)


@dataclass
class Setup:
    input_file: Path
    ray_out: Path
    ray_run: Launched
    api: ServerProcess
    worker: Launched
    gate: Gate


@pytest.fixture(scope="module")
def setup(
    tiny_model: Path, ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    """Starts at once: ``run --executor ray``, and an API (no worker) with one
    ``worker --executor ray`` on PostgreSQL."""
    root = tmp_path_factory.mktemp("ray")
    input_file = root / "input.jsonl"
    input_file.write_bytes(jsonl(requests()))
    model = ["--model", f"{TINY_NAME}={tiny_model}", *ENGINE_FLAGS]
    ray_out = root / "ray.jsonl"
    run = ["run", "-i", str(input_file), "-o", str(ray_out), *model, *ray_args(ray_cluster)]
    ray_run = launch(run, root / "ray-run.log")
    db_url = create_pg_database()
    served = ["--model", f"{TINY_NAME}={tiny_model}", "--database-url", db_url]
    api = spawn_server(["--no-worker", *served], root / "api", env=WORKER_ENV, wait_engine=False)
    worker_args = ["worker", *served, *ENGINE_FLAGS, "--max-num-seqs", "16"]
    worker_args += ["--data-dir", str(root / "api"), *ray_args(ray_cluster)]
    gate = Gate(root / "gate")  # no limit until a test sets one
    worker = launch(worker_args, root / "worker.log", {**WORKER_ENV, **gate.env}, PACED_CLI)
    try:
        yield Setup(input_file, ray_out, ray_run, api, worker, gate)
    finally:
        for launched in (ray_run, worker):
            launched.stop()
        stop_server(api)
        drop_pg_database(db_url)


@pytest.fixture(scope="module")
def reference(loop_thread: LoopThread, tiny_engine: Any) -> list[Any]:
    """Each request's ``choices`` from the engine in this process: what Ray must answer."""

    async def run_all() -> list[Any]:
        return await asyncio.gather(
            *(tiny_engine.run(r["url"], r["body"], f"ref-{i}") for i, r in enumerate(requests()))
        )

    results = loop_thread.run(run_all())
    assert all(r.ok for r in results)
    return [json.loads(r.body_json)["choices"] for r in results]


def replica_pid(worker: Launched, timeout: float = 240) -> int:
    """The pid of the worker's (first) Ray replica, once its engine is up."""
    deadline = time.monotonic() + timeout
    while not (found := REPLICA_READY.search(worker.log())):
        assert worker.process.poll() is None, worker.log()[-3000:]
        assert time.monotonic() < deadline, "the worker's Ray replica never came up"
        time.sleep(0.3)
    return int(found.group(1))


@pytest.mark.usefixtures("reference")  # computed while the replicas start
def test_openai_sdk_round_trip_on_a_ray_worker(setup: Setup, ray_cluster: RayCluster) -> None:
    assert replica_pid(setup.worker) in ray_cluster.head.pids()  # an actor of the cluster
    client = OpenAI(base_url=setup.api.base_url, api_key="x", max_retries=3)
    body = [chat_line(i, TINY_NAME, f"Short question {i}?") for i in range(30)]
    upload = client.files.create(file=("in.jsonl", jsonl(body)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    final = wait_for_batch(client, batch.id)
    assert final.status == "completed" and final.request_counts is not None
    assert final.request_counts.model_dump() == {"total": 30, "completed": 30, "failed": 0}
    results = parse_jsonl(client.files.content(final.output_file_id).text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(30)]
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in results)
    assert all(r["response"]["body"]["model"] == TINY_NAME for r in results)


def test_killed_replica_lines_come_out_once_and_unchanged(
    setup: Setup, reference: list[Any]
) -> None:
    first = replica_pid(setup.worker)
    # The worker may start 40 more requests: the batch (160) cannot end before the kill.
    setup.gate.allow(setup.gate.started(setup.worker.process.pid) + 40)
    client = OpenAI(base_url=setup.api.base_url, api_key="x", max_retries=3)
    upload = client.files.create(file=("in.jsonl", setup.input_file.read_bytes()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 240
    while (counts := client.batches.retrieve(batch.id).request_counts) is None or (
        counts.completed < 20
    ):
        assert time.monotonic() < deadline, f"20 of the 40 allowed lines not done: {counts}"
        time.sleep(0.05)
    killed_at = counts.completed
    os.kill(first, signal.SIGKILL)
    setup.gate.allow(None)
    wait_for_batch(client, batch.id, timeout=300)
    assert killed_at < COUNT, "the batch finished before the replica was killed"
    results = assert_exactly_once(client, batch.id, COUNT)
    assert [r["response"]["body"]["choices"] for r in results] == reference
    log = setup.worker.log()
    assert "Ray replica 0 died" in log, log[-3000:]
    # The engine took the loss: no chunk was handed back and run again (all first attempts).
    assert "engine failed on chunk" not in log
    assert attempts_used(results, batch.id).keys() == {"1"}
    assert replica_pid_now(setup.worker) != first


def replica_pid_now(worker: Launched) -> int:
    back = re.findall(r"Ray replica 0 is back \(pid (\d+)\)", worker.log())
    assert back, worker.log()[-3000:]
    return int(back[-1])


def test_ray_run_writes_what_the_engine_answers(setup: Setup, reference: list[Any]) -> None:
    assert setup.ray_run.wait() == 0, setup.ray_run.log()[-3000:]
    log = setup.ray_run.log()
    assert "Ray: joined 127.0.0.1:" in log and "Ray replicas ready" in log
    output = parse(setup.ray_out.read_text())
    assert [line["custom_id"] for line in output] == [f"request-{i}" for i in range(COUNT)]
    assert all(line["response"]["status_code"] == 200 and not line["error"] for line in output)
    assert [line["response"]["body"]["choices"] for line in output] == reference
