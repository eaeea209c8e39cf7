"""Faults for real, on a real server subprocess and the real (tiny) vLLM engine.

- the database goes away for 35 s mid-batch (SQLite: the test holds the write lock;
  PostgreSQL: connections refused and terminated): the batch still completes, every line
  exactly once, no finished result thrown away, and ``/ready`` tells the truth throughout.

Worker restarts and an engine that cannot load: ``test_worker_restarts.py``.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from openai import OpenAI

from tests.conftest import PG_ADMIN_DSN, TINY_NAME, create_pg_database, drop_pg_database
from tests.e2e.conftest import ServerProcess, spawn_server, stop_server
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.paced import PACED_CLI, Gate

OUTAGE_SECONDS = 35.0
"""Longer than every timeout in play: the lease (20 s), SQLite's busy timeout (25 s here) and
the connection pool's wait (10 s), so each of them expires during the outage."""
FAULT_ENV = {
    "VLLM_BATCH_SQLITE_BUSY_TIMEOUT": "25",
    "VLLM_BATCH_DB_POOL_TIMEOUT": "10",
    "VLLM_BATCH_FLUSH_INTERVAL": "0.3",
    "VLLM_BATCH_LEASE_SECONDS": "20",
    "VLLM_BATCH_CHUNK_SIZE": "20",
    "VLLM_BATCH_MAX_NUM_SEQS": "4",
}
TOOK_CHUNK = re.compile(r"took chunk (\S+) \(lines")
MID_CHUNK = 30
"""Requests the engine may start before an outage: the second chunk (20 lines) half done."""


def model_args(model: Path, db_url: str) -> list[str]:
    return ["--model", f"{TINY_NAME}={model}", "--max-model-len", "512", "--database-url", db_url]


def submit(client: OpenAI, lines: int, max_tokens: int = 24) -> str:
    body = [chat_line(i, TINY_NAME, max_tokens=max_tokens, ignore_eos=True) for i in range(lines)]
    upload = client.files.create(file=("in.jsonl", jsonl(body)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return batch.id


def wait_mid_chunk(client: OpenAI, batch_id: str, timeout: float = 180) -> int:
    """Wait until the second chunk or a later one is running and partly saved (the
    caller's gate holds the engine at ``MID_CHUNK`` started requests, so it will be)."""
    chunk = int(FAULT_ENV["VLLM_BATCH_CHUNK_SIZE"])
    deadline = time.monotonic() + timeout
    while True:
        counts = client.batches.retrieve(batch_id).request_counts
        assert counts is not None
        if counts.completed > chunk and 3 <= counts.completed % chunk <= chunk // 2:
            return counts.completed
        assert time.monotonic() < deadline, f"never caught a chunk half done: {counts}"
        time.sleep(0.1)


def ready(url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{url}/ready", timeout=15)
    return response.status_code, response.json()


def wait_ready_200(url: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = ready(url)
        if code == 200:
            return body
        assert time.monotonic() < deadline, f"/ready still {code}: {body}"
        time.sleep(1)


def assert_exactly_once(client: OpenAI, batch_id: str, lines: int) -> list[dict[str, Any]]:
    """Completed, exact counts, one successful output line per input line, in order."""
    final = client.batches.retrieve(batch_id)
    assert final.status == "completed", final
    assert final.request_counts is not None
    assert final.request_counts.model_dump() == {"total": lines, "completed": lines, "failed": 0}
    assert final.error_file_id is None
    assert final.output_file_id is not None
    results = parse_jsonl(client.files.content(final.output_file_id).text)
    ids = [r["custom_id"] for r in results]
    assert ids == [f"request-{i}" for i in range(lines)], "gaps, duplicates or disorder"
    assert all(r["response"]["status_code"] == 200 for r in results)
    return results


def attempts_used(results: list[dict[str, Any]], batch_id: str) -> Counter[str]:
    """How many lines ran under each attempt number (request_id ``{batch}-{line}-{attempt}``)."""
    counts: Counter[str] = Counter()
    for r in results:
        request_id = r["response"]["request_id"]
        assert request_id.startswith(f"{batch_id}-"), request_id
        counts[request_id.rsplit("-", 1)[1]] += 1
    return counts


def assert_no_result_discarded(log: str, results: list[dict[str, Any]], batch_id: str) -> None:
    """Each chunk was taken once and every line ran under the same attempt: nothing re-ran."""
    taken = Counter(TOOK_CHUNK.findall(log))
    assert taken, "the server log names no chunk taken"
    assert "lost the lease" not in log, "a worker lost its lease: its unsaved results were lost"
    retaken = {chunk: n for chunk, n in taken.items() if n > 1}
    assert not retaken, f"chunks taken more than once (finished work was redone): {retaken}"
    assert len(attempts_used(results, batch_id)) == 1, attempts_used(results, batch_id)


def watch_outage(
    server: ServerProcess, seconds: float, poke: Any = None, every: float = 5.0
) -> list[int]:
    """Poll ``/ready`` for ``seconds`` while the database is down; the server must live."""
    codes: list[int] = []
    end = time.monotonic() + seconds
    last_poke = 0.0
    while time.monotonic() < end:
        assert server.process.poll() is None, f"server died:\n{server.log()[-3000:]}"
        if poke is not None and time.monotonic() - last_poke >= every:
            poke()
            last_poke = time.monotonic()
        try:
            codes.append(ready(server.url)[0])
        except httpx.HTTPError:
            codes.append(-1)
        time.sleep(2)
    return codes


# ------------------------------------------------------------------ database outages


def run_outage_test(
    tiny_model: Path,
    tmp_path: Path,
    db_url: str,
    start_outage: Any,
    end_outage: Any,
    poke: Any = None,
) -> None:
    lines = 160  # 8 chunks: the gate catches the second half done; the rest waits out the outage
    gate = Gate(tmp_path / "gate")
    gate.allow(MID_CHUNK)
    server = spawn_server(
        model_args(tiny_model, db_url),
        tmp_path / "data",
        env={**FAULT_ENV, **gate.env},
        cli=PACED_CLI,
    )
    try:
        client = OpenAI(base_url=server.base_url, api_key="x", max_retries=5)
        assert ready(server.url)[0] == 200
        batch_id = submit(client, lines, max_tokens=32)
        wait_mid_chunk(client, batch_id)
        started = time.monotonic()
        start_outage()
        gate.allow(None)  # the engine works on through the outage
        try:
            codes = watch_outage(server, OUTAGE_SECONDS, poke)
        finally:
            end_outage()
        outage = time.monotonic() - started
        assert outage >= OUTAGE_SECONDS
        during = client.batches.retrieve(batch_id)
        assert during.status == "in_progress", during
        # /ready said 503 for (nearly) the whole outage: allow the first poll's race.
        assert codes and codes.count(503) >= len(codes) - 1, codes
        wait_ready_200(server.url)
        wait_for_batch(client, batch_id, timeout=400)
        results = assert_exactly_once(client, batch_id, lines)
        log = server.log()
        assert "worker died" not in log and "returned unexpectedly" not in log
        assert "database unavailable" in log  # the worker did meet the outage
        assert_no_result_discarded(log, results, batch_id)
        print(f"outage {outage:.0f}s; /ready during outage: {Counter(codes)}")
    finally:
        stop_server(server)


def test_sqlite_write_lock_held_35s_mid_batch(tiny_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "faults.db"
    lock = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)

    def start() -> None:
        lock.execute("BEGIN EXCLUSIVE")

    def end() -> None:
        lock.execute("ROLLBACK")
        lock.close()

    run_outage_test(tiny_model, tmp_path, f"sqlite+aiosqlite:///{path}", start, end)


async def _pg_admin(*statements: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def test_postgresql_refused_and_terminated_35s_mid_batch(tiny_model: Path, tmp_path: Path) -> None:
    db_url = create_pg_database()
    name = db_url.rsplit("/", 1)[1]
    terminate = (
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )

    def start() -> None:
        asyncio.run(_pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false', terminate))

    def poke() -> None:
        asyncio.run(_pg_admin(terminate))

    def end() -> None:
        asyncio.run(_pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))

    try:
        run_outage_test(tiny_model, tmp_path, db_url, start, end, poke)
    finally:
        asyncio.run(_pg_admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true'))
        drop_pg_database(db_url)
