"""``/v1/responses`` batches on the real engine through vLLM's ``OpenAIServingResponses``,
via the openai SDK, on SQLite and PostgreSQL: response objects with ``output`` items and
usage; bodies that do not fit the endpoint become error lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from openai.types.responses import Response

from tests.conftest import TINY_NAME, LiveServer
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch


def responses_line(index: int, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"request-{index}",
        "method": "POST",
        "url": "/v1/responses",
        "body": {
            "model": TINY_NAME,
            "input": f"Tell me about number {index}.",
            "max_output_tokens": 8,
            "temperature": 0,
            **body,
        },
    }


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def submit(client: OpenAI, lines: list[dict[str, Any]], endpoint: str = "/v1/responses") -> Any:
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    return wait_for_batch(client, created.id)


def test_responses_round_trip(client: OpenAI) -> None:
    lines = [responses_line(i) for i in range(5)]
    lines[3]["body"]["input"] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hello there."}]}
    ]
    lines[4]["body"]["instructions"] = "You are terse."
    batch = submit(client, lines)
    assert batch.status == "completed" and batch.endpoint == "/v1/responses"
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    results = parse_jsonl(client.files.content(batch.output_file_id).text)
    assert [r["custom_id"] for r in results] == [f"request-{i}" for i in range(5)]
    input_tokens = output_tokens = 0
    for result in results:
        response = Response.model_validate(result["response"]["body"])  # the SDK's own type
        # The tiny model never ends on its own: each response stops at max_output_tokens.
        assert response.object == "response" and response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.model == TINY_NAME
        [message] = [item for item in response.output if item.type == "message"]
        assert message.role == "assistant" and response.output_text
        assert response.usage is not None and 0 < response.usage.output_tokens <= 8
        assert response.usage.total_tokens == (
            response.usage.input_tokens + response.usage.output_tokens
        )
        input_tokens += response.usage.input_tokens
        output_tokens += response.usage.output_tokens
    assert batch.usage.input_tokens == input_tokens
    assert batch.usage.output_tokens == output_tokens
    # Deterministic at temperature 0: the same input gives the same text in another batch.
    again = submit(client, [responses_line(0)])
    first = parse_jsonl(client.files.content(again.output_file_id).text)[0]
    assert Response.model_validate(first["response"]["body"]).output_text == (
        Response.model_validate(results[0]["response"]["body"]).output_text
    )


def test_wrong_bodies_become_error_lines(client: OpenAI) -> None:
    chat_body = chat_line(1, TINY_NAME)["body"]  # "messages", no "input"
    lines = [
        responses_line(0),
        {**responses_line(1), "body": chat_body},
        responses_line(2, stream=True),
        responses_line(3, max_output_tokens="many"),
        responses_line(4, background=True),
    ]
    batch = submit(client, lines)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 1, "failed": 4}
    errors = {
        e["custom_id"]: e for e in parse_jsonl(client.files.content(batch.error_file_id).text)
    }
    assert sorted(errors) == ["request-1", "request-2", "request-3", "request-4"]
    for error in errors.values():
        assert error["response"]["status_code"] == 400, error
        assert error["error"]["message"]
    assert errors["request-1"]["response"]["body"]["error"]["param"] == "input"
    assert errors["request-2"]["response"]["body"]["error"]["param"] == "stream"
    assert errors["request-3"]["response"]["body"]["error"]["param"] == "max_output_tokens"


def test_chat_line_in_a_responses_batch_fails_validation(client: OpenAI) -> None:
    lines = [responses_line(0), chat_line(1, TINY_NAME)]
    batch = submit(client, lines)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("mismatched_endpoint", 2, "url")
