"""docs/troubleshooting.md quotes each error exactly as the code produces it.

Each numbered entry's first ``text`` block is its message. The tests below make the server's
own code produce it (the edge middleware, the upload check, batch validation, the webhook
guard, the CLI, the migrations) and compare. Entry 2 (a port in use) starts a real server:
``tests/e2e/test_troubleshooting_port.py``. Entry 1's message comes from vLLM and Hugging
Face; the parts this project writes are checked against the code.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import sqlite3
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import typer.main
from alembic.util.exc import CommandError
from fastapi import FastAPI

from tests.doc_blocks import DOCS, ROOT
from vllm_batch.api.batch_routes import check_webhook_url
from vllm_batch.api.edge import install_edge
from vllm_batch.api.errors import APIError
from vllm_batch.batches.store.db import create_engine, migrate
from vllm_batch.cli import app
from vllm_batch.config import Settings
from vllm_batch.pipeline.input import UploadRejected, copy_upload, plan_batch

PAGE = DOCS / "troubleshooting.md"


def message(number: int) -> str:
    """The message quoted by entry ``number`` (its first ``text`` block, one line)."""
    text = PAGE.read_text()
    section = re.search(rf"^## {number}\. .*?(?=^## )", text, re.S | re.M)
    assert section is not None, number
    block = re.search(r"```text\n(.*?)\n```", section.group(0), re.S)
    assert block is not None, number
    return block.group(1)


def test_ten_entries() -> None:
    titles = re.findall(r"^## (\d+)\. ", PAGE.read_text(), re.M)
    assert titles == [str(n) for n in range(1, 11)]


async def edge_answer(settings: Settings, method: str, path: str, headers: dict[str, str]) -> Any:
    """The edge middleware's answer (status, JSON body) to a request with no body sent."""
    api = FastAPI()

    @api.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def reached() -> dict[str, str]:
        return {"reached": "yes"}

    install_edge(api, settings)
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 4080),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(event: MutableMapping[str, Any]) -> None:
        sent.append(dict(event))

    await api(scope, receive, send)
    status = sent[0]["status"]
    body = b"".join(e.get("body", b"") for e in sent[1:])
    return status, json.loads(body)


def test_1_model_does_not_load_parts_are_ours() -> None:
    text = message(1)
    assert text.startswith("model SmolLM2-135M-Instruct failed to load (attempt 1): OSError: ")
    manager = ROOT / "vllm_batch" / "engines" / "manager.py"
    assert '"model %s failed to load (attempt %d): %s; retrying in %.0f s"' in manager.read_text()
    status = (ROOT / "vllm_batch" / "worker" / "status.py").read_text()
    assert 'f"engine for {names} cannot load (retrying with backoff)"' in status
    assert "engine for SmolLM2-135M-Instruct cannot load (retrying with backoff)" in (
        PAGE.read_text()
    )


def test_3_wrong_api_key() -> None:
    settings = Settings(api_key="sk-right-key-123")
    status, body = asyncio.run(
        edge_answer(settings, "GET", "/v1/batches", {"host": "127.0.0.1:4080"})
    )
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"] == message(3)


def test_4_host_without_key() -> None:
    status, body = asyncio.run(
        edge_answer(Settings(), "GET", "/v1/batches", {"host": "batch.example.com"})
    )
    assert status == 400 and body["error"]["code"] == "invalid_host"
    assert body["error"]["message"] == message(4)


def test_5_pretty_printed_json_upload() -> None:
    pretty = json.dumps({"custom_id": "q1", "method": "POST"}, indent=2).encode()
    with pytest.raises(UploadRejected) as refused:
        copy_upload(io.BytesIO(pretty), io.BytesIO(), max_bytes=1 << 20, check_jsonl=True)
    assert str(refused.value) == message(5)
    array = b'[{"custom_id": "q1"}]\n'
    with pytest.raises(UploadRejected) as refused:
        copy_upload(io.BytesIO(array), io.BytesIO(), max_bytes=1 << 20, check_jsonl=True)
    assert str(refused.value).endswith("line 1 must be a JSON object, got list.")


def test_6_openai_model_name() -> None:
    line = {
        "custom_id": "q1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]},
    }
    plan = plan_batch(
        io.BytesIO(json.dumps(line).encode() + b"\n"),
        endpoint="/v1/chat/completions",
        served_models=Settings().served_model_names,
        max_requests=50_000,
        chunk_size=5_000,
    )
    [error] = plan.errors
    assert (error["code"], error["line"], error["param"]) == ("model_not_found", 1, "body.model")
    assert error["message"] == message(6)


def test_7_file_too_large_at_the_default_limit() -> None:
    headers = {
        "host": "127.0.0.1:4080",
        "content-type": "multipart/form-data; boundary=x",
        "content-length": str(300 * 1024 * 1024),
    }
    status, body = asyncio.run(edge_answer(Settings(), "POST", "/v1/files", headers))
    assert status == 413 and body["error"]["code"] == "file_too_large"
    assert body["error"]["message"] == message(7)


def test_8_loopback_webhook() -> None:
    with pytest.raises(APIError) as refused:
        asyncio.run(check_webhook_url(Settings(), {"webhook_url": "http://127.0.0.1:9000/hook"}))
    assert refused.value.message == message(8)


def test_9_remote_engine_without_upstream() -> None:
    command = typer.main.get_command(app)
    with pytest.raises(Exception) as refused:
        command.main(["serve", "--engine", "openai"], standalone_mode=False)
    assert refused.value.format_message() == message(9)  # type: ignore[attr-defined]


def test_10_database_newer_than_the_code(tmp_path: Path) -> None:
    path = tmp_path / "vllm-batch.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    asyncio.run(migrate(engine))
    with sqlite3.connect(path) as db:  # what a newer version's next migration leaves
        [(head,)] = db.execute("select version_num from alembic_version").fetchall()
        db.execute("update alembic_version set version_num = ?", (f"{int(head) + 1:04d}",))
    with pytest.raises(CommandError) as refused:
        asyncio.run(migrate(engine))
    asyncio.run(engine.dispose())
    number = re.compile(r"'\d{4}'")  # the page cannot know the next migration's number
    assert number.sub("'NNNN'", str(refused.value)) == number.sub("'NNNN'", message(10))
    assert f"'{int(head) + 1:04d}'" in str(refused.value)
