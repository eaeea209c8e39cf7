"""The remote engine (``--engine openai``) against a real vLLM OpenAI server on loopback
(the tiny model), one server for the whole module:

- the in-process engine's end-to-end API tests (``test_batches_engine``: openai SDK upload,
  create, poll, download, errors, cancel, expiry), run here on the remote engine, on SQLite
  and on PostgreSQL;
- a batch for a model no upstream serves fails validation, naming the upstreams;
- ``vllm-batch run --engine openai`` gives the upstream's own answers;
- faults: the upstream killed (SIGKILL) mid-batch and restarted; a proxy in front of it
  answering 429 (with ``Retry-After``) and 503. Every line comes out exactly once, with
  the answers of an undisturbed run (temperature 0).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    TINY_NAME,
    LiveServer,
    LoopThread,
    database,
    engine_settings,
    start_server,
)
from tests.e2e.test_run_command import ENV, comparable, input_text, parse
from tests.fault_proxy import fault_proxy
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.integration.test_batches_engine import (  # the same tests, on the remote engine
    client,
    submit,
    test_cancel_running_batch_keeps_finished_results,
    test_chat_batch_round_trip,
    test_completions_endpoint,
    test_expiry_keeps_finished_and_marks_the_rest,
    test_list_batches_paginates,
    test_output_files_expire_when_asked,
    test_request_errors_become_error_lines,
    test_sampling_parameters_are_applied,
    test_temperature_zero_is_deterministic,
)
from tests.paced import Gate, PacedEngine
from tests.vllm_upstream import VllmUpstream
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines import make_engine

__all__ = [
    "client",
    "test_cancel_running_batch_keeps_finished_results",
    "test_chat_batch_round_trip",
    "test_completions_endpoint",
    "test_expiry_keeps_finished_and_marks_the_rest",
    "test_list_batches_paginates",
    "test_output_files_expire_when_asked",
    "test_request_errors_become_error_lines",
    "test_sampling_parameters_are_applied",
    "test_temperature_zero_is_deterministic",
]
FAULT_LINES = 160
PACED_LINES = 60  # requests the fault test lets start before it kills the upstream
live_server = contextlib.contextmanager(start_server)


@pytest.fixture(scope="module")
def upstream(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmUpstream]:
    server = VllmUpstream(tiny_model, TINY_NAME, tmp_path_factory.mktemp("upstream"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def remote_settings(tiny_model: Path, urls: list[str], **overrides: Any) -> Settings:
    """``engine_settings`` on the remote engine: the tiny model as the upstreams call it."""
    values: dict[str, Any] = {
        "engine": "openai",
        "engine_urls": urls,
        "models": [TINY_NAME],
        "engine_max_concurrency": 16,
        "engine_latency_factor": 0,  # CPU: latency grows with the batch; no online traffic
        "engine_health_interval": 0.5,
    }
    values.update(overrides)
    return engine_settings(tiny_model, **values)


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLite only: this module is about the remote engine; the database paths it uses are
    the in-process engine's, which run on both databases elsewhere."""
    with database("sqlite", tmp_path_factory.mktemp("db") / "test.db") as url:
        yield url


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    upstream: VllmUpstream,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    """``test_batches_engine``'s server, on the remote engine: overrides conftest's."""
    settings = remote_settings(
        tiny_model,
        [upstream.url],
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        chunk_size=16,
    )
    yield from start_server(loop_thread, settings, None)


def test_model_no_upstream_serves_fails_validation(client: OpenAI, upstream: VllmUpstream) -> None:
    batch = wait_for_batch(client, submit(client, [chat_line(0, "no-such-model")]).id)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    error = batch.errors.data[0]
    assert (error.code, error.line, error.param) == ("model_not_found", 1, "body.model")
    assert error.message == (
        f"The model 'no-such-model' is not served by any upstream ({upstream.url}). "
        f"Served models: {TINY_NAME}."
    )


# ------------------------------------------------------------------ vllm-batch run


def test_run_command_gives_the_upstreams_answers(upstream: VllmUpstream, tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(input_text())
    command = [sys.executable, "-m", "vllm_batch.cli", "run", "-i", str(inp), "-o", str(out)]
    command += ["--engine", "openai", "--engine-url", upstream.url, "--model", TINY_NAME]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = parse(out.read_bytes())
    requests = [json.loads(raw) for raw in inp.read_text().splitlines() if raw.strip()]
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    errors = {line["custom_id"] for line in lines if line["error"] is not None}
    assert errors == {"req-3", "req-5"}  # unknown model; an embeddings url on a chat model
    with httpx.Client(timeout=60) as http:
        for line, request in zip(lines, requests, strict=True):
            if line["error"] is None:
                direct = http.post(f"{upstream.url}/chat/completions", json=request["body"])
                assert line["response"]["body"]["choices"] == direct.json()["choices"]
    assert comparable(lines[0])[1] == 200


# ------------------------------------------------------------------ faults


def fault_input() -> bytes:
    return jsonl(
        [chat_line(i, TINY_NAME, max_tokens=16, ignore_eos=True) for i in range(FAULT_LINES)]
    )


@pytest.fixture(scope="module")
def undisturbed(
    loop_thread: LoopThread, upstream: VllmUpstream, tiny_model: Path, tmp_path_factory: Any
) -> dict[str, str]:
    """The fault batch's answers (custom_id -> content) from an undisturbed run."""
    settings = fault_settings(tiny_model, [upstream.url], tmp_path_factory.mktemp("undisturbed"))
    with (
        live_server(loop_thread, settings, None) as live,
        OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client,
    ):
        batch = wait_for_batch(client, submit_file(client, fault_input()), timeout=120)
        assert batch.status == "completed"
        return contents(client, batch)


def fault_settings(tiny_model: Path, urls: list[str], data_dir: Path) -> Settings:
    return remote_settings(
        tiny_model,
        urls,
        data_dir=data_dir,
        database_url=f"sqlite+aiosqlite:///{data_dir / 'faults.db'}",
        chunk_size=20,
        engine_retry_seconds=240,
    )


def submit_file(client: OpenAI, data: bytes) -> str:
    upload = client.files.create(file=("faults.jsonl", data), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def contents(client: OpenAI, batch: Any) -> dict[str, str]:
    """custom_id -> answer, checking that every line came out exactly once, in order."""
    assert batch.request_counts.model_dump() == {
        "total": FAULT_LINES,
        "completed": FAULT_LINES,
        "failed": 0,
    }
    assert batch.error_file_id is None
    results = parse_jsonl(client.files.content(batch.output_file_id).text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(FAULT_LINES)]
    assert len({r["id"] for r in results}) == FAULT_LINES
    tokens = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in results)
    assert tokens == batch.usage.output_tokens == FAULT_LINES * 16
    return {
        r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in results
    }


def test_upstream_killed_mid_batch_and_restarted(
    loop_thread: LoopThread,
    upstream: VllmUpstream,
    tiny_model: Path,
    tmp_path: Path,
    undisturbed: dict[str, str],
) -> None:
    settings = fault_settings(tiny_model, [upstream.url], tmp_path)
    # The engine starts at most PACED_LINES requests before the kill (fewer than the file
    # has), so the batch cannot end before the upstream dies, however fast the machine.
    gate = Gate(tmp_path / "gate")
    gate.allow(PACED_LINES)

    def paced(spec: ModelSpec) -> Any:
        return PacedEngine(make_engine(spec, settings), gate.path)

    try:
        with (
            live_server(loop_thread, settings, None, engine_factory=paced) as live,
            OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client,
        ):
            batch_id = submit_file(client, fault_input())
            deadline = time.monotonic() + 120
            while (done := client.batches.retrieve(batch_id).request_counts.completed) < 20:
                assert time.monotonic() < deadline, "the batch never started"
                time.sleep(0.05)
            upstream.kill()
            gate.allow(None)  # the rest waits for an upstream, not for the gate
            time.sleep(2)  # no upstream: requests wait for one, none fails
            assert client.batches.retrieve(batch_id).status == "in_progress"
            worker = httpx.get(f"{live.url}/ready").json()["worker"]
            assert worker["upstreams"] == {"healthy": 0, "total": 1}
            killed = time.monotonic()
            upstream.start()
            restarted = time.monotonic()
            batch = wait_for_batch(client, batch_id, timeout=180)
            print(f"restart {restarted - killed:.1f} s, rest {time.monotonic() - restarted:.1f} s")
            assert batch.status == "completed", batch
            assert done < FAULT_LINES
            assert contents(client, batch) == undisturbed
            worker = httpx.get(f"{live.url}/ready").json()["worker"]
            assert worker["upstreams"] == {"healthy": 1, "total": 1}
    finally:
        if not upstream.running():
            upstream.start()


def test_upstream_answering_429_and_503(
    loop_thread: LoopThread,
    upstream: VllmUpstream,
    tiny_model: Path,
    tmp_path: Path,
    undisturbed: dict[str, str],
) -> None:
    def plan(n: int) -> int | None:  # of every 5 requests: one 429, one 503, 3 pass
        return {1: 429, 3: 503}.get(n % 5)

    with fault_proxy(upstream.url, models=[TINY_NAME], plan=plan, retry_after="1") as proxy:
        settings = fault_settings(tiny_model, [proxy.url, upstream.url], tmp_path)
        with (
            live_server(loop_thread, settings, None) as live,
            OpenAI(base_url=live.base_url, api_key="x", max_retries=0) as client,
        ):
            batch = wait_for_batch(client, submit_file(client, fault_input()), timeout=180)
            assert batch.status == "completed", batch
            assert contents(client, batch) == undisturbed
    # (Retry-After itself is timed in tests/unit/test_remote_engine.py: here requests already
    # on their way when a 429 is answered reach the proxy after it.)
    answered = [seen.answered for seen in proxy.posts()]
    assert answered.count(429) >= 1 and answered.count(503) >= 1
    assert answered.count(200) >= 1  # the proxied upstream served lines too
