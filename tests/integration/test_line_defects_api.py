"""Over real HTTP (SQLite and PostgreSQL, no engine): an upload with bytes that are not
UTF-8 is refused naming the line, and a batch with an empty ``custom_id`` fails validation
with that line's error."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, api_only_server
from tests.helpers import chat_line, jsonl


@pytest.fixture(scope="module")
def api(
    loop_thread: LoopThread,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    yield from api_only_server(loop_thread, tiny_model, database_url, tmp_path_factory)


def upload(api: LiveServer, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{api.base_url}/files",
        files={"file": ("in.jsonl", body)},
        data={"purpose": "batch"},
        timeout=30,
    )


def test_invalid_utf8_upload_is_refused_naming_the_line(api: LiveServer) -> None:
    body = jsonl([chat_line(0, TINY_NAME), chat_line(1, TINY_NAME)])
    body += b'{"custom_id": "caf\xe9", "method": "POST"}\n'  # Latin-1, not UTF-8
    response = upload(api, body)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "Invalid JSONL: line 3 is not valid UTF-8 (byte 0xe9 at byte 19 of the "
        "line); batch files must be UTF-8 encoded.",
        "type": "invalid_request_error",
        "param": "file",
        "code": "invalid_utf8",
    }
    listed = httpx.get(f"{api.base_url}/files", timeout=30).json()["data"]
    assert all(f["filename"] != "in.jsonl" or f["bytes"] != len(body) for f in listed)


def test_empty_custom_id_fails_the_batch_with_its_line(api: LiveServer) -> None:
    lines = [chat_line(0, TINY_NAME), {**chat_line(1, TINY_NAME), "custom_id": ""}]
    uploaded = upload(api, jsonl(lines))
    assert uploaded.status_code == 200, uploaded.text
    created = httpx.post(
        f"{api.base_url}/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
        timeout=30,
    )
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    deadline = time.monotonic() + 30
    while (batch := httpx.get(f"{api.base_url}/batches/{batch_id}").json())["status"] in (
        "validating",
    ):
        assert time.monotonic() < deadline, "batch still validating after 30 s"
        time.sleep(0.1)
    assert batch["status"] == "failed"
    assert batch["errors"]["data"] == [
        {
            "code": "invalid_value",
            "line": 2,
            "message": "'custom_id' must not be empty: each line needs a unique, "
            "non-empty custom_id.",
            "param": "custom_id",
        }
    ]
