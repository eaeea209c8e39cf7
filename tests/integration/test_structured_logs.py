"""A real batch on the shared engine: JSON log lines carry request, batch, chunk and worker
ids, and neither the API key nor any request body is ever written."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from vllm_batch.observability import logs

KEY = "sk-structured-logs-0123456789"
MARKER = "purple-elephant-7431"  # appears only in the request bodies


@pytest.fixture(scope="module")
def captured(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    vllm_logger = logging.getLogger("vllm")
    vllm_saved = (list(vllm_logger.handlers), vllm_logger.propagate)
    levels = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    for name in ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL"):
        monkeypatch_module.setenv(name, "")  # restored (or removed again) afterwards
        monkeypatch_module.delenv(name)
    stream = io.StringIO()
    logs.configure_logging("info", "json", stream)
    logs.add_secrets([KEY])
    yield stream
    root.handlers[:] = saved[0]
    vllm_logger.handlers[:], vllm_logger.propagate = vllm_saved
    logging.captureWarnings(False)
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logs._secrets.clear()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def api(
    captured: io.StringIO,
    loop_thread: LoopThread,
    tiny_engine: Any,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("logs")
    settings = engine_settings(
        tiny_model,
        data_dir=data,
        database_url=f"sqlite+aiosqlite:///{data}/db",
        chunk_size=2,
        api_key=KEY,
    )
    yield from start_server(loop_thread, settings, tiny_engine)


def run_batch(api: LiveServer) -> str:
    auth = {"Authorization": f"Bearer {KEY}"}
    lines = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": TINY_NAME,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"{MARKER} {i}"}],
            },
        }
        for i in range(4)
    ]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    with httpx.Client(base_url=api.base_url, headers=auth, timeout=30) as client:
        upload = client.post(
            "/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
        )
        batch = client.post(
            "/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
            headers={"X-Request-Id": "req-create-1"},
        ).json()
        deadline = time.monotonic() + 120
        while batch["status"] != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.3)
            batch = client.get(f"/batches/{batch['id']}").json()
        refused = client.get("/batches", headers={"Authorization": "Bearer sk-wrong-key-98765"})
        assert refused.status_code == 401
    return str(batch["id"])


def test_real_run_logs_carry_ids_and_no_secrets(api: LiveServer, captured: io.StringIO) -> None:
    batch_id = run_batch(api)
    done_line = f'"batch {batch_id} completed'
    deadline = time.monotonic() + 30  # the finalizer logs just after the status is saved
    while done_line not in captured.getvalue():
        assert time.monotonic() < deadline, f"no '{done_line[1:]}' log line 30 s after it"
        time.sleep(0.05)
    output = captured.getvalue()
    records = [json.loads(line) for line in output.splitlines()]
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)

    during_create = [r for r in records if r.get("request_id") == "req-create-1"]
    [create] = [r for r in during_create if r["logger"] == "vllm_batch.access"]
    assert create["path"] == "/v1/batches"
    # Validation runs for the request: its line names the request and the batch.
    [queued] = [r for r in during_create if r["message"].startswith(f"batch {batch_id} queued")]
    assert queued["batch_id"] == batch_id
    assert create["status"] == 200 and create["method"] == "POST"
    worker_id = api.app.state.ctx.worker.ctx.worker_id
    took = [r for r in records if r["message"].startswith(f"worker {worker_id} took chunk")]
    assert len(took) == 2  # 4 lines, chunks of 2
    chunks = set()
    for record in took:
        assert record["worker"] == worker_id and record["batch_id"] == batch_id
        assert record["chunk_id"] in record["message"]
        chunks.add(record["chunk_id"])
    assert len(chunks) == 2
    [done] = [r for r in records if r["message"].startswith(f"batch {batch_id} completed")]
    assert done["batch_id"] == batch_id and done["worker"] == worker_id
    assert "chunk_id" not in done and "request_id" not in done
    refused = [r for r in records if r.get("status") == 401]
    assert refused and refused[0]["path"] == "/v1/batches"

    assert KEY not in output and "sk-wrong-key-98765" not in output
    assert MARKER not in output  # request bodies never reach the logs
