"""Embeddings, score and rerank batches on the real vLLM pooling engine (all-MiniLM-L6-v2),
through the official ``openai`` SDK and Parasail's ``openai-batch``, on SQLite and PostgreSQL.

The server serves two models of different kinds: MiniLM (embed, detected from its files)
and the tiny Llama (generate). The tiny model only answers validation here: no batch runs on
it, so its engine is never started.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types import CreateEmbeddingResponse

from tests.conftest import (
    MINILM_NAME,
    TINY_NAME,
    LiveServer,
    LoopThread,
    pooling_settings,
    start_server_lending,
)
from tests.doc_blocks import noted
from tests.helpers import parse_jsonl, results, submit, wait_for_batch

THIS = "tests/integration/test_pooling_batches.py"
TEXTS = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply on Monday.",
    "Quantum computers use qubits.",
]


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    pooling_engine: Any,
    minilm_model: Path,
    tiny_model: Path,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = pooling_settings(
        minilm_model,
        models=[f"{MINILM_NAME}={minilm_model}", f"{TINY_NAME}={tiny_model}"],
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("data"),
        chunk_size=8,
    )
    yield from start_server_lending(loop_thread, settings, {MINILM_NAME: pooling_engine})


@pytest.fixture(scope="module")
def reference(minilm_model: Path) -> Callable[[str], list[float]]:
    """Sentence embeddings computed independently: transformers + mean pooling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_model)
    model = AutoModel.from_pretrained(minilm_model).eval()

    def embed(text: str) -> list[float]:
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
        return [float(x) for x in pooled[0]]

    return embed


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": {"model": MINILM_NAME, **body},
    }


def test_models_lists_every_model_with_its_kind(server: LiveServer) -> None:
    data = httpx.get(f"{server.base_url}/models").json()["data"]
    assert {(m["id"], m["kind"]) for m in data} == {(MINILM_NAME, "embed"), (TINY_NAME, "generate")}


def test_embeddings_batch_matches_mean_pooling(
    client: OpenAI, reference: Callable[[str], list[float]]
) -> None:
    lines = [line(f"single-{i}", "/v1/embeddings", input=text) for i, text in enumerate(TEXTS)]
    lines.append(line("list", "/v1/embeddings", input=TEXTS[:2]))
    lines.append(line("b64", "/v1/embeddings", input=TEXTS[3], encoding_format="base64"))
    batch = wait_for_batch(client, submit(client, lines, "/v1/embeddings").id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 6, "failed": 0}
    assert batch.model == MINILM_NAME and batch.error_file_id is None
    assert batch.usage is not None and batch.usage.input_tokens > 0
    assert batch.usage.output_tokens == 0
    out = results(client, batch.output_file_id)

    for i, text in enumerate(TEXTS):
        response = out[f"single-{i}"]["response"]
        assert response["status_code"] == 200
        body = CreateEmbeddingResponse.model_validate(response["body"])
        assert body.object == "list" and body.model == MINILM_NAME
        assert body.usage.prompt_tokens > 0
        (item,) = body.data
        assert len(item.embedding) == 384
        assert cosine(item.embedding, reference(text)) >= 0.99

    pair = CreateEmbeddingResponse.model_validate(out["list"]["response"]["body"])
    assert [d.index for d in pair.data] == [0, 1]
    single = out["single-1"]["response"]["body"]["data"][0]["embedding"]
    assert cosine(pair.data[1].embedding, single) >= 0.9999

    encoded = out["b64"]["response"]["body"]["data"][0]["embedding"]
    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    vector = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert len(vector) == 384
    assert cosine(vector, out["single-3"]["response"]["body"]["data"][0]["embedding"]) >= 0.9999


def test_score_and_rerank_batches(client: OpenAI, reference: Callable[[str], list[float]]) -> None:
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    score_lines = [
        line("text", "/v1/score", text_1=TEXTS[0], text_2=TEXTS[1:]),
        line("queries", "/v1/score", queries=TEXTS[0], documents=[TEXTS[2]]),
    ]
    batch = wait_for_batch(client, submit(client, score_lines, "/v1/score").id)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    out = results(client, batch.output_file_id)
    scored = ScoreResponse.model_validate(out["text"]["response"]["body"])
    assert [d.index for d in scored.data] == [0, 1, 2]
    query = reference(TEXTS[0])
    for data, text in zip(scored.data, TEXTS[1:], strict=True):
        assert abs(data.score - cosine(query, reference(text))) < 0.01
    assert scored.data[0].score > scored.data[1].score  # the kitten beats the stock market
    other = ScoreResponse.model_validate(out["queries"]["response"]["body"])
    assert abs(other.data[0].score - scored.data[1].score) < 1e-4

    rerank_lines = [line("r", "/v1/rerank", query="Where is the cat?", documents=TEXTS, top_n=2)]
    batch = wait_for_batch(client, submit(client, rerank_lines, "/v1/rerank").id)
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch
    body = results(client, batch.output_file_id)["r"]["response"]["body"]
    reranked = RerankResponse.model_validate(body)
    assert len(reranked.results) == 2 and reranked.usage.prompt_tokens > 0
    assert reranked.results[0].relevance_score >= reranked.results[1].relevance_score
    assert reranked.results[0].index in (0, 1)
    assert reranked.results[0].document.text == TEXTS[reranked.results[0].index]


def test_wrong_kind_and_wrong_body_fail_naming_the_line(client: OpenAI) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    on_chat_model = [{**line("e", "/v1/embeddings"), "body": {"model": TINY_NAME, "input": "x"}}]
    batch = wait_for_batch(client, submit(client, on_chat_model, "/v1/embeddings").id)
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.line, error.param) == ("wrong_model_kind", 1, "body.model")
    assert f"'{TINY_NAME}' is a text-generation model" in error.message

    chat_on_embedder = [line("c0", "/v1/chat/completions", **chat)]
    batch = wait_for_batch(client, submit(client, chat_on_embedder, "/v1/chat/completions").id)
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.line) == ("wrong_model_kind", 1)
    assert "an embedding model" in error.message and "/v1/chat/completions" in error.message

    wrong_body = [
        line("ok", "/v1/embeddings", input="fine"),
        line("bad", "/v1/embeddings", prompt="hi", max_tokens=4),  # a completions body
        line("bytes", "/v1/embeddings", input="x", encoding_format="bytes"),
    ]
    batch = wait_for_batch(client, submit(client, wrong_body, "/v1/embeddings").id)
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("missing_required_parameter", 2, "body.input"),
        ("invalid_value", 3, "body.encoding_format"),
    ]


def test_per_request_errors_go_to_the_error_file(client: OpenAI) -> None:
    lines = [
        line("ok", "/v1/embeddings", input=TEXTS[0]),
        line("dims", "/v1/embeddings", input=TEXTS[0], dimensions=128),  # not Matryoshka
        line("type", "/v1/embeddings", input={"not": "text"}),
    ]
    batch = wait_for_batch(client, submit(client, lines, "/v1/embeddings").id)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    errors = results(client, batch.error_file_id)
    dims = errors["dims"]
    assert dims["response"]["status_code"] == 400
    assert "does not support Matryoshka" in dims["error"]["message"]
    assert dims["response"]["body"]["error"]["param"] == "dimensions"
    assert errors["type"]["response"]["status_code"] == 400
    assert "Invalid request body" in errors["type"]["error"]["message"]
    assert results(client, batch.output_file_id)["ok"]["response"]["status_code"] == 200


def test_parasail_openai_batch_embedding_score_and_rerank(
    server: LiveServer, tmp_path: Path
) -> None:
    from openai_batch import Batch as ParasailBatch
    from openai_batch.providers import Provider

    provider = Provider(name="local", base_url=server.base_url, api_key="unused")

    def run(kind: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # openai-batch 0.3.4 closes the file add_to_batch wrote before reading it back; the
        # docs' workaround (docs/clients.md): write it in a `with` block, then submit it by path.
        path = tmp_path / f"{kind}.jsonl"
        with ParasailBatch(submission_input_file=path, provider=provider) as writer:
            for request in requests:
                writer.add_to_batch(model=MINILM_NAME, **request)
        batch = ParasailBatch(
            submission_input_file=path,
            output_file=tmp_path / f"{kind}-out.jsonl",
            error_file=tmp_path / f"{kind}-err.jsonl",
            provider=provider,
        )
        batch.batch_type = writer.batch_type  # the endpoint, as add_to_batch chose it
        status, output_path, error_path = batch.submit_wait_download(
            interval=0.3, status_callback=give_up_after(120)
        )
        assert status.status == "completed", status.errors
        assert error_path is None
        return parse_jsonl(Path(output_path).read_text())

    embedded = run("embedding", [{"input": text} for text in TEXTS[:2]])
    assert [len(r["response"]["body"]["data"][0]["embedding"]) for r in embedded] == [384, 384]
    scored = run("score", [{"text_1": TEXTS[0], "text_2": TEXTS[1]}])
    assert scored[0]["response"]["body"]["data"][0]["object"] == "score"
    # openai-batch sends rerank requests (query + documents) to /v1/score.
    reranked = run("rerank", [{"query": "Where is the cat?", "documents": TEXTS[:3]}])
    assert len(reranked[0]["response"]["body"]["results"]) == 3


def give_up_after(seconds: float) -> Callable[[Any], None]:
    """A ``status_callback`` for ``submit_wait_download`` that stops a batch stuck for good."""
    deadline = time.monotonic() + seconds

    def check(batch: Any) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch.id} still {batch.status} after {seconds}s")

    return check


def readme_lines() -> list[dict[str, Any]]:
    """The docs' example line per pooling endpoint (its model name is ours here)."""
    block = noted(THIS, "each line run as a batch").code
    return parse_jsonl(block.replace('"all-MiniLM-L6-v2"', f'"{MINILM_NAME}"'))


def test_readme_example_lines(client: OpenAI) -> None:
    lines = readme_lines()
    assert [line["url"] for line in lines] == ["/v1/embeddings", "/v1/score", "/v1/rerank"]
    for example in lines:
        batch = wait_for_batch(client, submit(client, [example], example["url"]).id)
        assert batch.status == "completed" and batch.request_counts.completed == 1, batch
    (reranked,) = results(client, batch.output_file_id).values()
    assert reranked["response"]["body"]["results"][0]["index"] == 1  # the cat, not markets
