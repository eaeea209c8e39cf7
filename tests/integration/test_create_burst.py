"""Issue 19's burst: 80 concurrent ``POST /v1/batches`` from 4 API keys (SQLite and
PostgreSQL, default pool sizes, the shared tiny engine) all answer 200 within 15 s, and
every batch then completes with all its lines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl

KEYS = {f"burst-{n}": f"sk-burst-{n}" for n in range(4)}
BURST = 80
LINES = 2


@pytest.fixture(scope="module")
def burst_server(
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = engine_settings(
        tiny_model,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        api_keys=[f"{name}:{key}" for name, key in KEYS.items()],
    )
    yield from start_server(loop_thread, settings, tiny_engine)


async def burst(base_url: str, files: dict[str, str]) -> tuple[list[httpx.Response], float]:
    """``BURST`` creates at once, round-robin over the keys; returns them and the wall time."""
    keys = list(files)
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as http:
        started = time.monotonic()
        responses = await asyncio.gather(
            *(
                http.post(
                    "/batches",
                    headers={"Authorization": f"Bearer {keys[n % len(keys)]}"},
                    json={
                        "input_file_id": files[keys[n % len(keys)]],
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                    },
                )
                for n in range(BURST)
            )
        )
        return responses, time.monotonic() - started


def test_80_concurrent_creates_from_4_keys_all_succeed_and_complete(
    burst_server: LiveServer,
) -> None:
    base = burst_server.base_url
    files = {}
    for key in KEYS.values():
        body = jsonl([chat_line(i, TINY_NAME, max_tokens=2) for i in range(LINES)])
        response = httpx.post(
            f"{base}/files",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("in.jsonl", body)},
            data={"purpose": "batch"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        files[key] = response.json()["id"]

    responses, elapsed = asyncio.run(burst(base, files))
    failures = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not failures, f"{len(failures)} of {BURST} creates failed: {failures[:3]}"
    assert elapsed < 15, f"the burst took {elapsed:.1f}s"

    owner_of = {r.json()["id"]: r.request.headers["authorization"][7:] for r in responses}
    assert len(owner_of) == BURST
    pending = dict(owner_of)
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=base, timeout=30) as http:
        while pending:
            for batch_id, key in list(pending.items()):
                batch = http.get(
                    f"/batches/{batch_id}", headers={"Authorization": f"Bearer {key}"}
                ).json()
                if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                    assert batch["status"] == "completed", batch
                    assert batch["request_counts"] == {
                        "total": LINES,
                        "completed": LINES,
                        "failed": 0,
                    }, batch
                    del pending[batch_id]
            assert time.monotonic() < deadline, (
                f"{len(pending)} of {BURST} batches not completed after 120 s"
            )
            time.sleep(0.5)
