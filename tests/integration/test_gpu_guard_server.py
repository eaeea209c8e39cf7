"""The GPU guard and the CUDA OOM back-off through a real worker on the real (tiny) engine.

GPU readings are injected (this machine has no GPU); the OOM comes from a TEST-ONLY
wrapper around the shared engine that raises PyTorch's CUDA OOM error on its first calls.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client import REGISTRY
from sqlalchemy import select

from tests.conftest import TINY_NAME, LiveServer, LoopThread, engine_settings, start_server
from tests.gpu_fakes import (
    OomRaisingEngineForTests,
    OomScriptForTests,
    ScriptedReadingsForTests,
    gpu,
)
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from vllm_batch.batches.store.rows import ChunkRow
from vllm_batch.config import ModelSpec


def settings_for(tiny_model: Path, tmp_path: Path, **overrides: Any) -> Any:
    return engine_settings(
        tiny_model,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        data_dir=tmp_path / "data",
        gpu_poll_interval=0.1,
        deliveries=False,
        **overrides,
    )


def submit(server: LiveServer, lines: list[dict[str, Any]]) -> str:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    return batch.id


def chunks(server: LiveServer, batch_id: str) -> list[ChunkRow]:
    async def query(session: Any) -> list[ChunkRow]:
        rows = await session.scalars(select(ChunkRow).where(ChunkRow.batch_id == batch_id))
        return list(rows)

    return list(server.db(query))


def ready_gpu(server: LiveServer) -> dict[str, Any]:
    body = httpx.get(f"{server.url}/ready").json()
    assert body["status"] == "ready", body  # a hot GPU pauses claims, never readiness
    gpu_state: dict[str, Any] = body["gpu"]
    return gpu_state


@pytest.fixture
def hot_server(
    loop_thread: LoopThread, tiny_engine: Any, tiny_model: Path, tmp_path: Path
) -> Iterator[tuple[LiveServer, ScriptedReadingsForTests]]:
    readings = ScriptedReadingsForTests(gpu(60))
    settings = settings_for(tiny_model, tmp_path, chunk_size=4)
    for server in start_server(loop_thread, settings, tiny_engine, gpu_source=readings):
        yield server, readings


def test_hot_gpu_holds_claims_until_it_cools(
    hot_server: tuple[LiveServer, ScriptedReadingsForTests], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_batch.observability.gpu_guard")
    server, readings = hot_server
    assert ready_gpu(server)["claims_paused"] is False
    readings.set(gpu(90))
    deadline = time.monotonic() + 10
    while not (state := ready_gpu(server))["claims_paused"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    assert state["available"] is True
    assert state["pause_reason"] == "GPU 0 at 90 °C (pause at 85 °C)"
    assert state["gpus"][0]["temperature_celsius"] == 90 and "uuid" not in state["gpus"][0]
    assert httpx.get(server.url).json()["gpu"]["claims_paused"] is True

    lines = [chat_line(i, TINY_NAME, max_tokens=4) for i in range(8)]
    batch_id = submit(server, lines)
    deadline = time.monotonic() + 30
    while len(chunks(server, batch_id)) < 2:  # validated into two chunks, then held
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reads = readings.reads
    time.sleep(1.5)
    assert readings.reads > reads  # still watching the GPU meanwhile
    assert [(c.status, c.attempts) for c in chunks(server, batch_id)] == [("queued", 0)] * 2
    assert server.app.state.ctx.worker.current_chunk is None

    readings.set(gpu(83))  # cooler, but not below the resume mark: still held
    time.sleep(0.6)
    assert [c.status for c in chunks(server, batch_id)] == ["queued"] * 2
    assert ready_gpu(server)["pause_reason"] == "GPU 0 at 83 °C (resume at 80 °C or below)"

    readings.set(gpu(75))
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        batch = wait_for_batch(client, batch_id, timeout=120)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 8, "completed": 8, "failed": 0}
    state = ready_gpu(server)
    assert state["claims_paused"] is False and state["pauses"] == 1
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU guard")]
    assert len(messages) == 2, messages
    assert messages[0] == "GPU guard: pausing claims for new work: GPU 0 at 90 °C (pause at 85 °C)"
    assert "resuming claims" in messages[1] and "cooled down (GPU 0 75 °C)" in messages[1]
    assert REGISTRY.get_sample_value("vllm_batch_gpu_claims_paused") == 0


@pytest.fixture
def oom_server(
    loop_thread: LoopThread, tiny_engine: Any, tiny_model: Path, tmp_path: Path
) -> Iterator[tuple[LiveServer, OomScriptForTests]]:
    script = OomScriptForTests(remaining=2)

    def factory(spec: ModelSpec) -> OomRaisingEngineForTests:
        return OomRaisingEngineForTests(tiny_engine, script)

    settings = settings_for(tiny_model, tmp_path, chunk_size=16, max_chunk_attempts=1)
    for server in start_server(
        loop_thread,
        settings,
        None,
        engine_factory=factory,
        gpu_source=ScriptedReadingsForTests(gpu(60)),
    ):
        yield server, script


def test_cuda_oom_shrinks_the_window_and_retries_the_chunk(
    oom_server: tuple[LiveServer, OomScriptForTests],
    tiny_engine: Any,
    loop_thread: LoopThread,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="vllm_batch.worker.loop")
    server, script = oom_server
    oom_before = REGISTRY.get_sample_value("vllm_batch_oom_backoffs_total", {"model": TINY_NAME})
    lines = [chat_line(i, TINY_NAME, max_tokens=4) for i in range(6)]
    batch_id = submit(server, lines)
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as client:
        batch = wait_for_batch(client, batch_id, timeout=120)
        assert batch.status == "completed", batch
        assert batch.request_counts.model_dump() == {"total": 6, "completed": 6, "failed": 0}
        assert batch.error_file_id is None
        results = parse_jsonl(client.files.content(batch.output_file_id).text)

    # Every line is answered as the engine answers it directly (greedy decoding).
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(6)]
    for line, result in zip(lines, results, strict=True):
        assert result["error"] is None and result["response"]["status_code"] == 200
        direct = loop_thread.run(
            tiny_engine.run(line["url"], line["body"], f"ref-{line['custom_id']}")
        )
        got = result["response"]["body"]["choices"][0]["message"]["content"]
        assert got == json.loads(direct.body_json)["choices"][0]["message"]["content"]

    # Two OOMs, two back-offs: 128 -> 64 -> 32 requests in flight, max_num_seqs 64 -> 32 -> 16,
    # each time on a restarted engine; the chunk was retried, never counted as a failure
    # (max_chunk_attempts=1 would have failed its lines otherwise).
    assert script.raised == 2
    assert script.caps == [32, 16] and script.starts == 3
    ctx = server.app.state.ctx
    assert vars(ctx.engines.limits[TINY_NAME]) == {"max_in_flight": 32, "max_num_seqs": 16}
    (chunk,) = chunks(server, batch_id)
    assert chunk.status == "done" and chunk.engine_failures == 0 and chunk.attempts == 3
    assert ctx.worker.gpu.oom_backoffs == 2
    after = REGISTRY.get_sample_value("vllm_batch_oom_backoffs_total", {"model": TINY_NAME})
    assert after == (oom_before or 0) + 2
    warnings = [r.getMessage() for r in caplog.records if "CUDA out of memory" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "in-flight window 128 -> 64, max_num_seqs 64 -> 32 (engine restarts)" in warnings[0]
    assert "in-flight window 64 -> 32, max_num_seqs 32 -> 16 (engine restarts)" in warnings[1]
    worker = httpx.get(f"{server.url}/ready").json()["worker"]
    assert worker["oom_limits"] == {TINY_NAME: {"max_in_flight": 32, "max_num_seqs": 16}}
