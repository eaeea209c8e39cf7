"""``/metrics`` on a live server with the real vLLM engine (SQLite and PostgreSQL): scraped
while a batch runs and after, the counters, histograms, queue gauges and vLLM's own
engine stats move as the batch does; the batch's timeline (dashboard JSON) is in order and
its four phases are observed once."""

from __future__ import annotations

import time
from typing import Any

import httpx
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer
from tests.helpers import TERMINAL, chat_line, jsonl
from tests.metrics_helpers import Scrape, scrape

LINES = 40


def shared_prefix_line(index: int) -> dict[str, Any]:
    """A chat line whose system prompt every line shares: prefix-cache hits.

    The prompt spans more than one KV-cache block (128 tokens on CPU): only whole blocks hit.
    """
    line = chat_line(index, TINY_NAME, max_tokens=24, ignore_eos=True)
    line["body"]["messages"] = [
        {"role": "system", "content": "You are a terse assistant. " * 20},
        {"role": "user", "content": f"Count to {index}."},
    ]
    return line


def test_a_batch_moves_the_metrics(server: LiveServer) -> None:
    url = f"{server.url}/metrics"
    before = scrape(url)
    client = OpenAI(base_url=server.base_url, api_key="unused")
    lines = [shared_prefix_line(i) for i in range(LINES)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    during: list[Scrape] = []
    deadline = time.monotonic() + 240
    while (status := client.batches.retrieve(batch.id).status) not in TERMINAL:
        assert time.monotonic() < deadline, f"batch still {status}"
        during.append(scrape(url))
        time.sleep(0.05)
    assert status == "completed"
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    model = {"model": TINY_NAME}
    # while it ran
    assert during, "the batch finished before the first scrape"
    assert max(s.get("vllm_batch_queue_lines", **model) for s in during) > 0
    assert max(s.get("vllm_batch_queue_batches", **model) for s in during) >= 1
    assert max(s.get("vllm_batch_batches", status="in_progress") for s in during) >= 1
    assert max(s.get("vllm_batch_engine_running_requests", **model) for s in during) > 0
    assert max(s.get("vllm_batch_engine_kv_cache_usage_ratio", **model) for s in during) > 0
    assert max(s.get("vllm_batch_lines_per_second", **model) for s in [*during, after]) > 0
    progress = [s.get("vllm_batch_lines_completed_total", **model) for s in during]
    assert progress == sorted(progress), "a counter went down"

    # after
    assert delta("vllm_batch_lines_completed_total", **model) == LINES
    assert delta("vllm_batch_lines_failed_total", **model) == 0
    assert delta("vllm_batch_request_latency_seconds_count", **model) == LINES
    assert delta("vllm_batch_request_latency_seconds_sum", **model) > 0
    assert delta("vllm_batch_tokens_total", **model, kind="output") == LINES * 24
    assert delta("vllm_batch_tokens_total", **model, kind="input") > 0
    assert delta("vllm_batch_tokens_total", **model, kind="cached") > 0
    assert delta("vllm_batch_chunk_claims_total", **model) >= 3  # 40 lines, chunks of 16
    assert delta("vllm_batch_batch_duration_seconds_count", **model, status="completed") == 1
    for phase in ("validation", "queue", "run", "finalize"):
        assert delta("vllm_batch_batch_phase_seconds_count", **model, phase=phase) == 1, phase
    assert delta("vllm_batch_batch_phase_seconds_sum", **model, phase="run") > 0
    assert delta("vllm_batch_batches", status="completed") == 1
    assert after.get("vllm_batch_queue_lines", **model) == 0
    assert after.get("vllm_batch_queue_batches", **model) == 0
    assert after.get("vllm_batch_queue_chunks", **model, status="queued") == 0
    # vLLM's own stats, under our names and the served model's label
    assert delta("vllm_batch_engine_prefix_cache_queries_total", **model) > 0
    assert delta("vllm_batch_engine_prefix_cache_hits_total", **model) > 0
    assert 0 < after.get("vllm_batch_engine_prefix_cache_hit_rate", **model) <= 1
    assert after.value("vllm_batch_engine_waiting_requests", **model) is not None
    assert after.get("vllm_batch_engine_loaded", **model) >= 1
    assert not any(name.startswith("vllm:") for name in after.names())

    # The timeline, on the dashboard: OpenAI's whole seconds around our precise stamps.
    shown = httpx.get(f"{server.base_url}/dashboard/batches/{batch.id}").json()
    first, last = shown["first_line_started_at"], shown["last_line_finished_at"]
    assert shown["created_at"] <= shown["in_progress_at"] <= first <= last
    assert int(last) <= shown["finalizing_at"] <= shown["completed_at"]
    assert shown["phases"]["run"] == round(last - first, 3) > 0
    assert all(shown["phases"][p] >= 0 for p in ("validation", "queue", "finalize"))
