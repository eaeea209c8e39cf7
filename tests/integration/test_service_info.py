"""``/`` and ``/ready`` on a live server (real engine, SQLite and PostgreSQL): ready when all
is well, and no ids (worker, chunk, batch) or error texts without a valid API key."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.helpers import chat_line, jsonl

KEY = "sk-service-info-test"


@pytest.fixture(scope="module")
def keyed_server(
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
        chunk_size=4,
        api_key=KEY,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def worker_id(server: LiveServer) -> str:
    return str(server.app.state.ctx.worker.ctx.worker_id)


def busy_snapshot(server: LiveServer, headers: dict[str, str]) -> tuple[list[str], str]:
    """Submit a batch, then read ``/`` and ``/ready`` while a chunk runs; (texts, batch id)."""
    client = OpenAI(base_url=server.base_url, api_key=KEY)
    lines = [chat_line(i, TINY_NAME, max_tokens=32, ignore_eos=True) for i in range(40)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 60
    while server.app.state.ctx.worker.current_chunk is None:
        assert time.monotonic() < deadline, "no chunk started"
        time.sleep(0.02)
    texts = [httpx.get(f"{server.url}{path}", headers=headers).text for path in ("/", "/ready")]
    return texts, batch.id


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}],
    ids=["no-key", "wrong-key", "not-bearer"],
)
def test_no_ids_without_a_valid_key(keyed_server: LiveServer, headers: dict[str, str]) -> None:
    texts, batch_id = busy_snapshot(keyed_server, headers)
    for text in texts:
        assert worker_id(keyed_server) not in text
        assert batch_id not in text and "batch_" not in text
        assert '"id"' not in text and "current_chunk" not in text and "details" not in text


def test_details_with_the_key(keyed_server: LiveServer) -> None:
    texts, _ = busy_snapshot(keyed_server, {"Authorization": f"Bearer {KEY}"})
    info, ready = texts
    assert worker_id(keyed_server) in info and worker_id(keyed_server) in ready
    assert "current_chunk" in ready


def test_ready_when_all_is_well_without_key_configured(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/ready", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["database"] == "ok" and body["reasons"] == {}
    assert body["worker"]["alive"] and body["worker"]["loaded_model"] == TINY_NAME
    assert body["services"]["housekeeping"]["running"]
    assert body["services"]["validation sweeper"]["running"]
    # No key configured: nobody is authenticated, so no ids for anyone.
    assert "details" not in body and worker_id(server) not in response.text
    info = httpx.get(f"{server.url}/").json()
    assert worker_id(server) not in str(info) and info["worker"]["enabled"]
