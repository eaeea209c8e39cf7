"""The vLLM engine process dies mid-batch (as on a GPU OOM): the worker restarts the engine
and resumes the chunk; the batch completes with every line exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
from openai import OpenAI

from tests.conftest import TINY_NAME
from tests.e2e.conftest import served
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch
from tests.paced import PACED_CLI, Gate


def engine_core(server_pid: int) -> psutil.Process:
    children = psutil.Process(server_pid).children(recursive=True)
    cores = [
        c for c in children if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()
    ]
    assert cores, [(c.pid, c.name(), c.cmdline()) for c in children]
    return cores[0]


def test_engine_crash_restarts_and_resumes(tiny_model: Path, tmp_path: Path) -> None:
    args = ["--model", f"{TINY_NAME}={tiny_model}", "--max-model-len", "512"]
    gate = Gate(tmp_path / "gate")
    gate.allow(60)  # the batch (200 lines) cannot end before the engine dies
    env = {"VLLM_BATCH_FLUSH_INTERVAL": "0.2", "VLLM_BATCH_MAX_NUM_SEQS": "16", **gate.env}
    for server in served(args, tmp_path / "data", env=env, cli=PACED_CLI):
        client = OpenAI(base_url=server.base_url, api_key="x")
        lines = [chat_line(i, TINY_NAME, max_tokens=16, ignore_eos=True) for i in range(200)]
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 120
        while (done := client.batches.retrieve(batch.id).request_counts.completed) < 30:
            assert time.monotonic() < deadline, f"{done} lines done in 120 s, waited for 30"
            time.sleep(0.2)
        first_core = engine_core(server.process.pid)
        first_core.kill()
        gate.allow(None)
        final = wait_for_batch(client, batch.id, timeout=300)
        assert final.status == "completed", server.log()[-3000:]
        assert final.request_counts.model_dump() == {"total": 200, "completed": 200, "failed": 0}
        ids = [r["custom_id"] for r in parse_jsonl(client.files.content(final.output_file_id).text)]
        assert ids == [f"request-{i}" for i in range(200)]
        assert engine_core(server.process.pid).pid != first_core.pid  # a new engine
        assert "restarting it" in server.log()
