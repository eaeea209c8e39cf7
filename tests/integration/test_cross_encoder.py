"""``/v1/score`` and ``/v1/rerank`` batches on a cross-encoder (kind ``score``) through the
server, on the tiny random-weight cross-encoder the project builds
(``vllm_batch.weights.cross_encoder``), served as ``NAME=PATH:score``. Scores are checked
against transformers; bodies against vLLM's own response models. The tiny Llama is served
too, for validation only (its engine never starts): a chat batch is then accepted, and its
line naming the cross-encoder fails with ``wrong_model_kind``.

``vllm-batch run`` on the same model: tests/e2e/test_vllm_run_batch_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI

from tests.conftest import (
    TINY_NAME,
    LiveServer,
    LoopThread,
    pooling_settings,
    shelved_engine,
    start_server_lending,
)
from tests.engine_budget import EngineShelf
from tests.helpers import cross_encoder_scores, results, submit, wait_for_batch

NAME = "tiny-reranker"
QUERY = "Where is the cat?"
DOCUMENTS = [
    "The cat sits on the mat.",
    "Stock markets fell sharply on Monday.",
    "A kitten is resting on a rug.",
]


@pytest.fixture(scope="module")
def engine(engine_shelf: EngineShelf, cross_encoder_model: Path) -> Iterator[Any]:
    settings = pooling_settings(cross_encoder_model, models=[f"{NAME}={cross_encoder_model}:score"])
    yield from shelved_engine(engine_shelf, "cross-encoder", settings)


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread,
    engine: Any,
    cross_encoder_model: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiveServer]:
    settings = pooling_settings(
        cross_encoder_model,
        models=[f"{NAME}={cross_encoder_model}:score", f"{TINY_NAME}={tiny_model}"],
        data_dir=tmp_path_factory.mktemp("data"),
    )
    yield from start_server_lending(loop_thread, settings, {NAME: engine})


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(cross_encoder_model: Path) -> Callable[[str, list[str]], list[float]]:
    return lambda query, documents: cross_encoder_scores(cross_encoder_model, query, documents)


def line(custom_id: str, url: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": NAME, **body}}


def run(client: OpenAI, lines: list[dict[str, Any]], endpoint: str) -> Any:
    return wait_for_batch(client, submit(client, lines, endpoint).id)


def test_models_lists_the_score_kind(server: LiveServer) -> None:
    data = httpx.get(f"{server.base_url}/models").json()["data"]
    assert {(m["id"], m["kind"]) for m in data} == {(NAME, "score"), (TINY_NAME, "generate")}


def test_score_batch_matches_transformers(
    client: OpenAI, reference: Callable[[str, list[str]], list[float]]
) -> None:
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    lines = [
        line("text", "/v1/score", text_1=QUERY, text_2=DOCUMENTS),
        line("pair", "/v1/score", text_1=QUERY, text_2=DOCUMENTS[2]),
        line("queries", "/v1/score", queries=QUERY, documents=DOCUMENTS[:2]),
        line("parasail-rerank", "/v1/score", query=QUERY, documents=DOCUMENTS),
    ]
    batch = run(client, lines, "/v1/score")
    assert batch.status == "completed" and batch.error_file_id is None, batch
    assert batch.request_counts.completed == 4 and batch.usage.input_tokens > 0
    out = results(client, batch.output_file_id)
    expected = reference(QUERY, DOCUMENTS)
    assert max(expected) - min(expected) > 0.01  # the pairs are told apart

    scored = ScoreResponse.model_validate(out["text"]["response"]["body"])
    assert scored.model == NAME and [d.index for d in scored.data] == [0, 1, 2]
    assert [d.score for d in scored.data] == pytest.approx(expected, rel=1e-4)
    pair = ScoreResponse.model_validate(out["pair"]["response"]["body"])
    assert [d.score for d in pair.data] == pytest.approx(expected[2:], rel=1e-4)
    queries = ScoreResponse.model_validate(out["queries"]["response"]["body"])
    assert [d.score for d in queries.data] == pytest.approx(expected[:2], rel=1e-4)
    # A rerank body sent to /v1/score (as Parasail's openai-batch does) is answered as one.
    reranked = RerankResponse.model_validate(out["parasail-rerank"]["response"]["body"])
    assert [r.relevance_score for r in reranked.results] == pytest.approx(
        sorted(expected, reverse=True), rel=1e-4
    )


def test_rerank_batch_orders_by_score(
    client: OpenAI, reference: Callable[[str, list[str]], list[float]]
) -> None:
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse

    batch = run(
        client, [line("r", "/v1/rerank", query=QUERY, documents=DOCUMENTS, top_n=2)], "/v1/rerank"
    )
    assert batch.status == "completed" and batch.request_counts.completed == 1, batch
    body = RerankResponse.model_validate(
        results(client, batch.output_file_id)["r"]["response"]["body"]
    )
    expected = reference(QUERY, DOCUMENTS)
    best = sorted(range(3), key=lambda i: expected[i], reverse=True)[:2]
    assert [r.index for r in body.results] == best
    assert [r.relevance_score for r in body.results] == pytest.approx(
        [expected[i] for i in best], rel=1e-4
    )
    assert [r.document.text for r in body.results] == [DOCUMENTS[i] for i in best]
    assert body.usage.prompt_tokens > 0


def test_endpoints_a_cross_encoder_does_not_serve(client: OpenAI) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    batch = run(client, [line("x", "/v1/chat/completions", **chat)], "/v1/chat/completions")
    assert batch.status == "failed", batch
    (error,) = batch.errors.data
    assert (error.code, error.line, error.param) == ("wrong_model_kind", 1, "body.model")
    assert f"'{NAME}' is a cross-encoder (score) model" in error.message
    assert "serves /v1/score, /v1/rerank, not /v1/chat/completions" in error.message

    with pytest.raises(BadRequestError) as refused:  # no served model embeds
        submit(client, [line("x", "/v1/embeddings", input="x")], "/v1/embeddings")
    assert refused.value.body == {
        "message": f"No served model supports /v1/embeddings. Served models: {NAME} (score), "
        f"{TINY_NAME} (generate).",
        "type": "invalid_request_error",
        "param": "endpoint",
        "code": "invalid_value",
    }


def test_wrong_bodies(client: OpenAI) -> None:
    batch = run(
        client,
        [
            line("ok", "/v1/rerank", query=QUERY, documents=DOCUMENTS),
            line("no-query", "/v1/rerank", documents=DOCUMENTS),
            line("chat-body", "/v1/rerank", messages=[{"role": "user", "content": "hi"}]),
        ],
        "/v1/rerank",
    )
    assert batch.status == "failed"
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("missing_required_parameter", 2, "body.query"),
        ("missing_required_parameter", 3, "body.query"),
        ("missing_required_parameter", 3, "body.documents"),
    ]
    batch = run(client, [line("one-side", "/v1/score", text_1=QUERY)], "/v1/score")
    assert batch.status == "failed"
    (error,) = batch.errors.data
    assert (error.code, error.param) == ("missing_required_parameter", "body")
    assert "needs two sides to score" in error.message

    # Well-formed but invalid for vLLM: that line's 400 in the error file, the rest runs.
    batch = run(
        client,
        [
            line("ok", "/v1/rerank", query=QUERY, documents=DOCUMENTS),
            line("bad-top-n", "/v1/rerank", query=QUERY, documents=DOCUMENTS, top_n="two"),
        ],
        "/v1/rerank",
    )
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 1, "failed": 1}
    bad = results(client, batch.error_file_id)["bad-top-n"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "top_n"
