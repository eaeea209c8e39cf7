"""The server as a subprocess on the tiny model, with an API key, driven by real clients:
the official openai SDK and Parasail's openai-batch."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from openai_batch import Batch as ParasailBatch
from openai_batch.providers import Provider

from tests.conftest import TINY_NAME
from tests.e2e.conftest import ServerProcess, served
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch

API_KEY = "sekret-key"


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server with its engine in-process (the engine on Ray actors, through the same
    ``make_engine``: ``test_ray_executor.py``)."""
    args = ["--model", f"{TINY_NAME}={tiny_model}", "--api-key", API_KEY, "--max-model-len", "512"]
    env = {"VLLM_BATCH_CORS_ORIGINS": "http://dashboard.test"}
    yield from served(args, tmp_path_factory.mktemp("e2e"), env=env)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


def test_auth_required_on_v1_only(server: ServerProcess) -> None:
    missing = httpx.get(f"{server.base_url}/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{server.base_url}/batches", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).files.list()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ok = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    assert [m["id"] for m in ok.json()["data"]] == [TINY_NAME]


def test_request_id_echoed_or_generated(server: ServerProcess) -> None:
    echoed = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"
    generated = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert generated.startswith("req_") and len(generated) > 10


def test_service_info_and_ready(server: ServerProcess) -> None:
    info = httpx.get(f"{server.url}/").json()
    assert info["name"] == "vLLM Batch Server" and info["models"] == [TINY_NAME]
    assert info["links"]["batches"] == "/v1/batches"
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["database"] == "ok"
    assert ready["worker"]["loaded_model"] == TINY_NAME


def test_openai_sdk_round_trip(client: OpenAI) -> None:
    upload = client.files.create(
        file=("in.jsonl", jsonl([chat_line(i, TINY_NAME) for i in range(25)])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    final = wait_for_batch(client, batch.id)
    assert final.status == "completed" and final.request_counts.completed == 25
    results = parse_jsonl(client.files.content(final.output_file_id).text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(25)]


def test_parasail_openai_batch_client(server: ServerProcess, tmp_path: Path) -> None:
    provider = Provider(
        name="local", base_url=server.base_url, api_key=API_KEY, requires_consistency=True
    )
    # openai-batch's own CLI flow: an existing JSONL file is submitted as-is.
    submission = tmp_path / "submit.jsonl"
    submission.write_bytes(
        jsonl(
            [
                {
                    "custom_id": f"line-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": TINY_NAME,
                        "max_tokens": 6,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": f"Question {i}?"}],
                    },
                }
                for i in range(1, 6)
            ]
        )
    )
    batch = ParasailBatch(
        submission_input_file=str(submission),
        output_file=tmp_path / "out.jsonl",
        error_file=tmp_path / "err.jsonl",
        provider=provider,
    )
    batch_id = batch.submit(metadata={"client": "openai-batch"})
    deadline = time.monotonic() + 120
    while (status := batch.status()).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status.status == "completed" and status.metadata == {"client": "openai-batch"}
    output_path, error_path = batch.download()
    assert error_path is None
    lines = [json.loads(x) for x in Path(output_path).read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == [f"line-{i}" for i in range(1, 6)]
    assert all(x["response"]["body"]["model"] == TINY_NAME for x in lines)
    assert batch_id.startswith("batch_")


def test_cors_is_configurable(server: ServerProcess) -> None:
    preflight = httpx.options(
        f"{server.base_url}/batches",
        headers={
            "Origin": "http://dashboard.test",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://dashboard.test"
    other = httpx.get(f"{server.url}/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers
