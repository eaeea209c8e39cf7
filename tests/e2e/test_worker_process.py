"""``serve`` runs its worker in a child process (``worker_mode = "process"``, the default):
the child is restarted when it dies alone, with ``/ready`` 503 meanwhile and every line
exactly once; SIGTERM drains it; a ``kill -9`` of serve stops the child and its engine
(the kernel sends the child SIGTERM when serve dies).

The API's latency with the worker there is measured in benchmarks/bench_api_latency.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
from openai import OpenAI

from tests.conftest import PRODUCT_TOPOLOGY, TINY_NAME
from tests.e2e.conftest import served, spawn_server, stop_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.paced import PACED_CLI, Gate

ARGS = ["--max-model-len", "512"]


def worker_child(serve_pid: int) -> psutil.Process:
    """serve's worker process (its only ``embedded-worker`` child)."""
    children = psutil.Process(serve_pid).children()
    found = [c for c in children if "embedded-worker" in c.cmdline()]
    assert len(found) == 1, [(c.pid, c.cmdline()) for c in children]
    return found[0]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_process_restarts_drains_and_dies_with_serve(
    tiny_model: Path, tmp_path: Path
) -> None:
    """One server, three lives of its worker: killed mid-batch (restarted, every line once),
    drained by serve's SIGTERM; then a second serve killed alone (its worker and engine go)."""
    gate = Gate(tmp_path / "gate")
    gate.allow(60)  # the 200-line batch cannot end before its worker is killed
    env = {"VLLM_BATCH_FLUSH_INTERVAL": "0.2", "VLLM_BATCH_MAX_NUM_SEQS": "16", **gate.env}
    args = ["--model", f"{TINY_NAME}={tiny_model}", *ARGS]
    server = spawn_server(args, tmp_path / "data", env=env, cli=PACED_CLI)
    try:
        ready = httpx.get(f"{server.url}/ready", timeout=10).json()
        first = worker_child(server.process.pid)
        assert ready["worker"]["alive"] is True, ready
        assert first.nice() == 10  # VLLM_BATCH_WORKER_NICE's default
        client = OpenAI(base_url=server.base_url, api_key="x")
        lines = [chat_line(i, TINY_NAME, max_tokens=8) for i in range(200)]
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        gate.wait_started(server.process, 60, server.log_path)
        first.kill()
        deadline = time.monotonic() + 60
        while (answer := httpx.get(f"{server.url}/ready", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "/ready stayed 200 with the worker dead"
            time.sleep(0.05)
        assert answer.status_code == 503, answer.text
        assert "worker process" in answer.json()["reasons"]["worker"], answer.json()
        gate.allow(None)
        final = wait_for_batch(client, batch.id, timeout=300)
        assert final.status == "completed", server.log()[-3000:]
        assert final.request_counts.model_dump() == {"total": 200, "completed": 200, "failed": 0}
        ids = [r["custom_id"] for r in parse_jsonl(client.files.content(final.output_file_id).text)]
        assert ids == [f"request-{i}" for i in range(200)]
        second = worker_child(server.process.pid)
        assert second.pid != first.pid
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["worker"]["restarts"] == 1, ready.json()
        assert f"worker process {first.pid} exited with code -9" in server.log()
    finally:
        code = stop_server(server)  # SIGTERM: the worker drains, then serve exits
    assert code in (0, -signal.SIGTERM), server.log()[-3000:]  # uvicorn re-raises SIGTERM
    assert "Application shutdown complete" in server.log()
    assert gone(second.pid)
    assert f"worker process {second.pid} stopped (exit code 0)" in server.log()

    # serve killed alone (not its process group): the kernel tells its worker, which stops
    # its engine instead of leaving it running.
    # vLLM's CPU default here: its own worker process must go too.
    for again in served(args, tmp_path / "data", env=PRODUCT_TOPOLOGY):
        child = worker_child(again.process.pid)
        family = [child, *child.children(recursive=True)]
        assert len(family) >= 3, family  # the worker, its EngineCore and vLLM's worker
        os.kill(again.process.pid, signal.SIGKILL)
        again.process.wait(30)
        deadline = time.monotonic() + 60
        while alive := [p.pid for p in family if not gone(p.pid)]:
            assert time.monotonic() < deadline, f"still alive 60 s after serve's kill -9: {alive}"
            time.sleep(0.2)
