"""Two `vllm-batch worker` processes on the real (tiny) engine share one batch through
PostgreSQL: every line exactly once, each worker takes chunks, both stop cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
from openai import OpenAI

from tests.conftest import TINY_NAME, create_pg_database, drop_pg_database
from tests.e2e.conftest import ServerProcess, spawn_server, stop_server
from tests.e2e.test_durability import LOADED
from tests.engine_budget import budgeted_popen
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch

LINES = 800  # 8 chunks of 100


def spawn_worker(model: Path, db_url: str, data_dir: Path, name: str) -> subprocess.Popen[bytes]:
    log = open(data_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return budgeted_popen(
        name,
        [
            sys.executable,
            "-m",
            "vllm_batch.cli",
            "worker",
            "--model",
            f"{TINY_NAME}={model}",
            "--max-model-len",
            "512",
            "--max-num-seqs",
            "16",
            "--database-url",
            db_url,
            "--data-dir",
            str(data_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_BATCH_CHUNK_SIZE": "100", "VLLM_BATCH_POLL_INTERVAL": "5"},
    )


async def chunk_owners(db_url: str, batch_id: str) -> dict[str, int]:
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT lease_owner, count(*) AS n FROM chunks "
            "WHERE batch_id = $1 GROUP BY lease_owner",
            batch_id,
        )
    finally:
        await conn.close()
    return {row["lease_owner"]: row["n"] for row in rows}


def test_two_workers_share_one_batch_exactly_once(tiny_model: Path, tmp_path: Path) -> None:
    db_url = create_pg_database()
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    workers: list[subprocess.Popen[bytes]] = []
    api: ServerProcess | None = None
    try:
        api = spawn_server(
            [
                "--no-worker",
                "--model",
                f"{TINY_NAME}={tiny_model}",
                "--database-url",
                db_url,
                "--chunk-size",
                "100",
            ],
            data_dir,
            wait_engine=False,
        )
        workers = [spawn_worker(tiny_model, db_url, data_dir, f"worker{i}") for i in range(2)]
        deadline = time.monotonic() + 480
        while not all(LOADED in (data_dir / f"worker{i}.log").read_text() for i in range(2)):
            assert all(w.poll() is None for w in workers), "a worker died"
            assert time.monotonic() < deadline, "workers did not load their engines"
            time.sleep(1)
        client = OpenAI(base_url=api.base_url, api_key="x")
        lines = [chat_line(i, TINY_NAME, max_tokens=16, ignore_eos=True) for i in range(LINES)]
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        final = wait_for_batch(client, batch.id, timeout=400)
        assert final.status == "completed"
        assert final.request_counts.completed == LINES and final.request_counts.failed == 0
        ids = [r["custom_id"] for r in parse_jsonl(client.files.content(final.output_file_id).text)]
        assert ids == [f"request-{i}" for i in range(LINES)]
        owners = asyncio.run(chunk_owners(db_url, batch.id))
        assert sum(owners.values()) == LINES // 100
        assert len(owners) == 2, f"each worker should have taken chunks: {owners}"
        # SIGTERM: every worker stops promptly and cleanly.
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            assert worker.wait(60) == 0
        assert httpx.get(f"{api.url}/ready").json()["database"] == "ok"
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
        if api is not None:
            stop_server(api)
        drop_pg_database(db_url)
