"""Batches run end to end on the real vLLM engine (tiny model), via the openai SDK,
on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI
from sqlalchemy import update

from tests.conftest import TINY_NAME, LiveServer
from tests.helpers import chat_line, completion_line, jsonl, parse_jsonl, wait_for_batch
from vllm_batch.batches.store.rows import BatchRow


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def submit(
    client: OpenAI,
    lines: list[dict[str, Any]],
    endpoint: str = "/v1/chat/completions",
    **kwargs: Any,
) -> Any:
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window=kwargs.pop("completion_window", "24h"),
        **kwargs,
    )


def test_chat_batch_round_trip(client: OpenAI, server: LiveServer) -> None:
    lines = [chat_line(i, TINY_NAME) for i in range(40)]
    created = submit(client, lines, metadata={"job": "round-trip"})
    assert created.status == "validating"
    assert created.id.startswith("batch_") and created.metadata == {"job": "round-trip"}

    batch = wait_for_batch(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert batch.model == TINY_NAME
    assert batch.error_file_id is None
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) is not None, stamp
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.expires_at == batch.created_at + 24 * 3600

    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output"
    text = client.files.content(batch.output_file_id).text
    assert output_file.bytes == len(text.encode())
    results = parse_jsonl(text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(40)]
    prompt_tokens = completion_tokens = 0
    for result in results:
        assert result["id"].startswith("batch_req_")
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == TINY_NAME
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert 0 < body["usage"]["completion_tokens"] <= 8
        prompt_tokens += body["usage"]["prompt_tokens"]
        completion_tokens += body["usage"]["completion_tokens"]
    assert batch.usage.input_tokens == prompt_tokens
    assert batch.usage.output_tokens == completion_tokens
    assert batch.usage.total_tokens == prompt_tokens + completion_tokens

    direct = httpx.get(f"{server.base_url}/batches/{batch.id}/results")
    assert direct.status_code == 200 and direct.text == text


def test_temperature_zero_is_deterministic(client: OpenAI) -> None:
    lines = [chat_line(i, TINY_NAME, "Same prompt every time.", max_tokens=12) for i in range(6)]
    batch = wait_for_batch(client, submit(client, lines).id)
    bodies = [
        r["response"]["body"] for r in parse_jsonl(client.files.content(batch.output_file_id).text)
    ]
    contents = {b["choices"][0]["message"]["content"] for b in bodies}
    assert len(contents) == 1


def test_completions_endpoint(client: OpenAI) -> None:
    lines = [completion_line(i, TINY_NAME) for i in range(10)]
    batch = wait_for_batch(client, submit(client, lines, endpoint="/v1/completions").id)
    assert batch.status == "completed"
    results = parse_jsonl(client.files.content(batch.output_file_id).text)
    assert len(results) == 10
    assert all(r["response"]["body"]["object"] == "text_completion" for r in results)
    assert all(isinstance(r["response"]["body"]["choices"][0]["text"], str) for r in results)


def test_sampling_parameters_are_applied(client: OpenAI) -> None:
    lines = [
        chat_line(0, TINY_NAME, max_tokens=5, n=2, temperature=0.8, seed=7),
        chat_line(1, TINY_NAME, max_tokens=6, logprobs=True, top_logprobs=2),
        chat_line(2, TINY_NAME, max_tokens=40, response_format={"type": "json_object"}),
        chat_line(
            3,
            TINY_NAME,
            max_completion_tokens=3,
            stop=["\n"],
            presence_penalty=0.5,
            frequency_penalty=0.5,
            top_p=0.9,
        ),
    ]
    batch = wait_for_batch(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 4, client.files.content(batch.error_file_id).text
    by_id = {
        r["custom_id"]: r["response"]["body"]
        for r in parse_jsonl(client.files.content(batch.output_file_id).text)
    }
    assert len(by_id["request-0"]["choices"]) == 2
    logprobs = by_id["request-1"]["choices"][0]["logprobs"]["content"]
    assert logprobs and len(logprobs[0]["top_logprobs"]) == 2
    assert by_id["request-3"]["usage"]["completion_tokens"] <= 3


def test_request_errors_become_error_lines(client: OpenAI) -> None:
    long_prompt = " ".join(["word"] * 2000)  # far beyond max_model_len=512
    lines = [chat_line(i, TINY_NAME) for i in range(6)]
    lines[2] = chat_line(2, TINY_NAME, long_prompt)
    lines[4] = chat_line(4, TINY_NAME, temperature=-3)
    batch = wait_for_batch(client, submit(client, lines).id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 4, "failed": 2}
    errors = parse_jsonl(client.files.content(batch.error_file_id).text)
    assert [e["custom_id"] for e in errors] == ["request-2", "request-4"]
    for error in errors:
        assert error["response"]["status_code"] == 400
        assert error["error"]["code"] and error["error"]["message"]
    assert (
        "context" in errors[0]["error"]["message"].lower()
        or "length" in errors[0]["error"]["message"].lower()
    )
    outputs = parse_jsonl(client.files.content(batch.output_file_id).text)
    assert [o["custom_id"] for o in outputs] == ["request-0", "request-1", "request-3", "request-5"]


def test_list_batches_paginates(client: OpenAI) -> None:
    ids = [submit(client, [chat_line(0, TINY_NAME)]).id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more is True
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    seen = [b.id for b in client.batches.list(limit=1)]  # auto-pagination across pages
    assert seen[:3] == ids[::-1]
    raw = httpx.get(f"{client.base_url}batches", params={"limit": 2}).json()
    assert raw["object"] == "list" and raw["first_id"] == ids[-1] and raw["last_id"] == ids[-2]
    for batch_id in ids:
        wait_for_batch(client, batch_id)


def test_cancel_running_batch_keeps_finished_results(client: OpenAI) -> None:
    lines = [chat_line(i, TINY_NAME, max_tokens=100, ignore_eos=True) for i in range(1000)]
    batch = submit(client, lines)
    wait_for_batch(client, batch.id, statuses={"in_progress"})
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait_for_batch(client, batch.id, timeout=60)
    assert final.status == "cancelled"
    assert final.cancelling_at is not None and final.cancelled_at is not None
    done = final.request_counts.completed + final.request_counts.failed
    assert done < 1000
    if final.output_file_id:
        results = parse_jsonl(client.files.content(final.output_file_id).text)
        assert len(results) == final.request_counts.completed
        assert len({r["custom_id"] for r in results}) == len(results)


def test_expiry_keeps_finished_and_marks_the_rest(client: OpenAI, server: LiveServer) -> None:
    lines = [chat_line(i, TINY_NAME, max_tokens=100, ignore_eos=True) for i in range(1000)]
    batch = submit(client, lines, completion_window="1h")
    assert batch.expires_at == batch.created_at + 3600

    async def shorten_window(session: Any) -> None:  # 1h is the shortest window accepted
        async with session.begin():
            await session.execute(
                update(BatchRow)
                .where(BatchRow.id == batch.id)
                .values(expires_at=BatchRow.created_at + 4)
            )

    server.db(shorten_window)
    final = wait_for_batch(client, batch.id, timeout=90)
    assert final.status == "expired" and final.expired_at is not None
    counts = final.request_counts
    assert counts.total == 1000 and counts.completed + counts.failed == 1000
    assert counts.failed > 0
    errors = parse_jsonl(client.files.content(final.error_file_id).text)
    assert len(errors) == counts.failed
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    done = []
    if final.output_file_id:
        done = parse_jsonl(client.files.content(final.output_file_id).text)
    assert len(done) == counts.completed
    ids = {r["custom_id"] for r in done} | {e["custom_id"] for e in errors}
    assert ids == {f"request-{i}" for i in range(1000)}


def test_output_files_expire_when_asked(client: OpenAI, server: LiveServer) -> None:
    upload = client.files.create(
        file=("in.jsonl", jsonl([chat_line(0, TINY_NAME)])), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}},
    )
    final = wait_for_batch(client, batch.id)
    output = client.files.retrieve(final.output_file_id)
    assert output.expires_at == output.created_at + 7200
