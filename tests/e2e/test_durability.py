"""Crash safety for real: the server is SIGKILLed mid-batch at random points, restarted,
and must finish with exactly one result per input line, matching an uninterrupted run.
Also SIGTERM (graceful). Two workers sharing one batch: ``test_shared_workers.py``."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, database, free_port
from tests.e2e.conftest import spawn_server, stop_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.paced import PACED_CLI, Gate

LINES = 200
LOADED = f"model {TINY_NAME} loaded"  # logged by the engine manager once vLLM is up
DURABLE_ENV = {
    "VLLM_BATCH_FLUSH_INTERVAL": "0.2",
    "VLLM_BATCH_FLUSH_EVERY": "32",
    "VLLM_BATCH_LEASE_SECONDS": "20",
    "VLLM_BATCH_CHUNK_SIZE": "40",
    "VLLM_BATCH_MAX_NUM_SEQS": "32",
}


def chunks_held(url: str) -> int:
    """``/ready``'s ``chunks_held`` (0 while a busy server is slow to answer)."""
    try:
        return int(httpx.get(f"{url}/ready", timeout=5).json()["worker"]["chunks_held"])
    except httpx.TimeoutException:
        return 0


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite, the embedded default. The resume path is the database's own on PostgreSQL
    too: its claims, leases and saves run on both databases in tests/unit
    (test_worker_faults, test_graceful_restarts, test_claim_order) and in
    test_continuous_feed, and real PostgreSQL processes are killed and restarted in
    test_faults, test_worker_restarts and test_shared_workers."""
    with database("sqlite", tmp_path / "crash.db") as url:
        yield url


def server_args(model: Path, db_url: str) -> list[str]:
    return ["--model", f"{TINY_NAME}={model}", "--max-model-len", "512", "--database-url", db_url]


def contents(client: OpenAI, file_id: str) -> dict[str, str]:
    return {
        r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
        for r in parse_jsonl(client.files.content(file_id).text)
    }


def test_kill9_and_sigterm_resume_exactly_once(
    tiny_model: Path, db_url: str, tmp_path: Path
) -> None:
    rng = random.Random(int(time.time()))
    data_dir = tmp_path / "data"
    port = free_port()
    lines = [chat_line(i, TINY_NAME, max_tokens=24, ignore_eos=True) for i in range(LINES)]
    args = server_args(tiny_model, db_url)
    # Each server life may start at most this many requests (2 x 80 < LINES): the batch
    # cannot end before the last stop, however fast the machine.
    gate = Gate(tmp_path / "gate")
    lives = [rng.randint(50, 80) for _ in range(2)]
    gate.allow(lives[0])
    env = {**DURABLE_ENV, **gate.env}
    server = spawn_server(args, data_dir, env=env, port=port, cli=PACED_CLI)
    client = OpenAI(base_url=server.base_url, api_key="x", max_retries=3)
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch_id = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    progress = []
    # Killed while several chunks are in flight on the one worker (continuous feed).
    deadline = time.monotonic() + 300
    while chunks_held(server.url) < 2:
        assert time.monotonic() < deadline, f"never two chunks held: {server.log()[-3000:]}"
        time.sleep(0.05)
    for kill in range(2):
        # Stopped mid-work: some requests running, some done, some held back by the gate.
        gate.wait_started(
            server.process, rng.randint(lives[kill] // 2, lives[kill]), server.log_path
        )
        before = client.batches.retrieve(batch_id)
        assert before.status == "in_progress", before
        sig = signal.SIGKILL if kill == 0 else signal.SIGTERM
        started = time.monotonic()
        code = stop_server(server, sig=sig)
        if sig == signal.SIGTERM:  # graceful: exits on its own, promptly, releasing leases
            # uvicorn re-raises the signal after its graceful shutdown completes.
            assert code in (0, -signal.SIGTERM), server.log()[-3000:]
            assert "worker " in server.log() and " stopped" in server.log()
            assert time.monotonic() - started < 45
            assert "Traceback" not in server.log().split("Shutting down")[-1]
        progress.append((before.status, before.request_counts.completed))
        gate.allow(lives[kill + 1] if kill + 1 < len(lives) else None)
        server = spawn_server(args, data_dir, env=env, port=port, cli=PACED_CLI)
        after = client.batches.retrieve(batch_id)
        assert after.request_counts.completed >= before.request_counts.completed  # kept
    final = wait_for_batch(client, batch_id, timeout=300)
    try:
        assert final.status == "completed", final
        assert final.request_counts.model_dump() == {
            "total": LINES,
            "completed": LINES,
            "failed": 0,
        }
        assert final.error_file_id is None
        results = parse_jsonl(client.files.content(final.output_file_id).text)
        ids = [r["custom_id"] for r in results]
        assert ids == [f"request-{i}" for i in range(LINES)], "gaps, duplicates or disorder"
        assert len({r["id"] for r in results}) == LINES
        # An uninterrupted run of the same file on the same server gives the same answers.
        again = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        reference = wait_for_batch(client, again.id, timeout=300)
        assert reference.status == "completed"
        assert contents(client, final.output_file_id) == contents(client, reference.output_file_id)
        assert (
            sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
            == final.usage.output_tokens
            == LINES * 24
        )
        print("kill points (status, completed):", progress)
    finally:
        stop_server(server)
