"""Structured outputs through the server on the real engine (tiny random-weight model):
``response_format`` ``json_schema``/``json_object`` on chat, vLLM's ``structured_outputs``
on completions and chat, ``text.format`` on the Responses API. Random weights still obey
the grammar, so every output must parse and validate against its schema. An invalid
schema is that line's error, not a crash. SQLite and PostgreSQL.

The tiny model would pad JSON with whitespace (the grammars allow any) until
``max_tokens``, so lines ban whitespace tokens with ``logit_bias`` (``whitespace_bias``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import TINY_NAME, LiveServer
from tests.helpers import (
    chat_line,
    completion_line,
    jsonl,
    parse_jsonl,
    wait_for_batch,
    whitespace_bias,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["color", "count", "ok", "tags"],
    "additionalProperties": False,
}
INVALID_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
MAX_TOKENS = 200


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}


def responses_line(index: int, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"request-{index}",
        "method": "POST",
        "url": "/v1/responses",
        "body": {
            "model": TINY_NAME,
            "input": f"Describe thing number {index} as JSON.",
            "max_output_tokens": MAX_TOKENS,
            "temperature": 0,
            **body,
        },
    }


@pytest.fixture(scope="module")
def no_ws(tiny_model: Path) -> dict[str, Any]:
    """Body fields that keep the tiny model's JSON free of whitespace padding."""
    return {"logit_bias": whitespace_bias(tiny_model)}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def run_batch(
    client: OpenAI, lines: list[dict[str, Any]], endpoint: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Run a batch to completion; returns (bodies of output lines, error lines) by custom_id."""
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    batch = wait_for_batch(client, created.id)
    assert batch.status == "completed", batch
    done = parse_jsonl(client.files.content(batch.output_file_id).text)
    errors = (
        parse_jsonl(client.files.content(batch.error_file_id).text) if batch.error_file_id else []
    )
    return (
        {r["custom_id"]: r["response"]["body"] for r in done},
        {r["custom_id"]: r for r in errors},
    )


def test_chat_json_schema_and_json_object(client: OpenAI, no_ws: dict[str, Any]) -> None:
    lines = [
        chat_line(i, TINY_NAME, max_tokens=MAX_TOKENS, response_format=fmt, **no_ws)
        for i, fmt in enumerate([json_schema_format(SCHEMA)] * 4 + [{"type": "json_object"}] * 2)
    ]
    bodies, errors = run_batch(client, lines, "/v1/chat/completions")
    assert not errors, errors
    for i in range(6):
        choice = bodies[f"request-{i}"]["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        value = json.loads(choice["message"]["content"])
        if i < 4:
            jsonschema.validate(value, SCHEMA)
        else:
            assert isinstance(value, dict)


def test_completions_structured_outputs(client: OpenAI, no_ws: dict[str, Any]) -> None:
    """vLLM's own ``structured_outputs`` options (a JSON schema, a choice, a regex), and a
    legacy ``guided_choice`` (translated: vLLM itself now ignores it)."""
    options: list[dict[str, Any]] = [
        {"json": SCHEMA},
        {"choice": ["yes", "no", "maybe"]},
        {"regex": "[A-Z][a-z]{2,5} [0-9]{3}"},
    ]
    lines = [completion_line(i, TINY_NAME, max_tokens=MAX_TOKENS) for i in range(len(options))]
    for line, option in zip(lines, options, strict=True):
        line["body"].update(structured_outputs=option, **no_ws)
    legacy = completion_line(3, TINY_NAME, max_tokens=MAX_TOKENS)  # older vLLM's name
    legacy["body"]["guided_choice"] = ["alpha", "beta"]
    bodies, errors = run_batch(client, [*lines, legacy], "/v1/completions")
    assert not errors, errors
    texts = [bodies[f"request-{i}"]["choices"][0]["text"] for i in range(4)]
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert texts[1] in {"yes", "no", "maybe"}
    assert re.fullmatch(options[2]["regex"], texts[2])
    assert texts[3] in {"alpha", "beta"}


def test_responses_text_format_json_schema(client: OpenAI, no_ws: dict[str, Any]) -> None:
    text_format = {"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA}}
    lines = [responses_line(i, text=text_format, **no_ws) for i in range(3)]
    bodies, errors = run_batch(client, lines, "/v1/responses")
    assert not errors, errors
    for body in bodies.values():
        assert body["object"] == "response" and body["status"] == "completed"
        assert body["text"]["format"]["schema"] == SCHEMA  # aliased field, as on the wire
        [message] = [item for item in body["output"] if item["type"] == "message"]
        jsonschema.validate(json.loads(message["content"][0]["text"]), SCHEMA)


def test_invalid_schema_is_the_line_error(client: OpenAI, no_ws: dict[str, Any]) -> None:
    lines = [
        chat_line(0, TINY_NAME, response_format=json_schema_format(INVALID_SCHEMA)),
        chat_line(1, TINY_NAME),
        chat_line(2, TINY_NAME, structured_outputs={"json": INVALID_SCHEMA}),
        chat_line(3, TINY_NAME, response_format=json_schema_format(SCHEMA), **no_ws),
    ]
    lines[3]["body"]["max_tokens"] = MAX_TOKENS
    bodies, errors = run_batch(client, lines, "/v1/chat/completions")
    assert sorted(errors) == ["request-0", "request-2"]
    for error in errors.values():
        assert error["response"]["status_code"] == 400
        assert error["error"]["code"] == "invalid_request_error"
        assert "Invalid type: no-such-type" in error["error"]["message"]
    assert sorted(bodies) == ["request-1", "request-3"]  # the rest of the batch ran
    content = bodies["request-3"]["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), SCHEMA)
