"""vLLM's own ``vllm run-batch`` test files through ``vllm-batch run`` (subprocesses, real engines).

The inputs are vLLM's, verbatim (``vllm_run_batch_inputs``), and so are the model names:
each run serves one of our models under the name vLLM's test uses. Every output line must
validate as vLLM's ``BatchRequestOutput`` and pass the checks vLLM's tests make (exit code 0;
no ``error`` on any score or rerank line; a non-zero exit for the invalid file), and ours.

Three runs, one after the other (one engine each; at once they starve other tests):

- the chat file on the tiny Llama, with ``--enable-metrics --port P``: ``/metrics`` is scraped
  while it runs (its two good lines sample up to 1000 tokens each: seconds);
- the embeddings file on all-MiniLM-L6-v2;
- the score and rerank files on the tiny cross-encoder, plus lines of our own that must fail
  (a wrong body, endpoints the model's kind does not serve), with the scores checked against
  transformers.

Not run here, because no small local model can serve them: vLLM's reasoning and tool-calling
files need Qwen3-0.6B with its ``qwen3`` reasoning parser or ``hermes`` tool parser
(``vllm-batch run`` refuses those flags with a reason: tests/unit/test_offline_cli.py); its
transcription and translation files need Whisper (audio endpoints are built separately).
vLLM's ``test_empty_file`` is tests/e2e/test_run_command.py::test_empty_input_gives_empty_output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e import vllm_run_batch_inputs as vllm
from tests.engine_budget import budgeted_popen
from tests.helpers import cross_encoder_scores
from tests.metrics_helpers import Scrape, parse
from tests.paced import PACED_CLI, Gate

ENGINE_FLAGS = ["--dtype", "float32", "--enforce-eager"]
RUN_TIMEOUT = 600
OUR_SCORE_LINES = [
    {
        "custom_id": "no-query",
        "method": "POST",
        "url": "/v1/rerank",
        "body": {"model": vllm.RERANKER_MODEL_NAME, "documents": ["Paris."]},
    },
    {
        "custom_id": "embeddings-on-cross-encoder",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": vllm.RERANKER_MODEL_NAME, "input": "Paris."},
    },
    {
        "custom_id": "chat-on-cross-encoder",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": vllm.RERANKER_MODEL_NAME,
            "messages": [{"role": "user", "content": "Hi"}],
        },
    },
]


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    output: Path
    log: Path
    scrapes: list[Scrape] = field(default_factory=list)

    def wait(self) -> int:
        try:
            return self.process.wait(RUN_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def lines(self) -> list[str]:
        assert self.process.returncode == 0, self.log.read_text()[-3000:]
        return self.output.read_text().strip().split("\n")


def start(
    folder: Path, name: str, model: str, text: str, *extra: str, gate: Gate | None = None
) -> Run:
    """``vllm-batch run`` on ``text``; with ``gate``, its engine is paced by it."""
    source, output, log = (folder / f"{name}{suffix}" for suffix in (".jsonl", ".out", ".log"))
    source.write_text(text)
    cli = PACED_CLI if gate is not None else "vllm_batch.cli"
    command = [sys.executable, "-m", cli, "run", "-i", str(source)]
    command += ["-o", str(output), "--model", model, *ENGINE_FLAGS, *extra]
    env = {**os.environ, **(gate.env if gate is not None else {})}
    with log.open("wb") as sink:
        process = budgeted_popen(name, command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    return Run(process, output, log)


def scrape_while_running(run: Run, url: str, gate: Gate, model: str) -> None:
    """Scrape ``url`` every 0.1 s until the run exits (failed scrapes: not up yet). The gate
    holds the engine's requests until a scrape has seen the engine loaded, no line done and
    the unknown-model line (refused before the engine) counted: certain to be mid-run."""
    held = True
    while run.process.poll() is None:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                run.scrapes.append(scrape := parse(response.text))
                if held and mid_run(scrape, model):
                    gate.allow(None)
                    held = False
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def mid_run(scrape: Scrape, model: str) -> bool:
    """The engine loaded, the two requests not done (the gate holds them), and the line
    refused before the engine (unknown model) already counted as failed."""
    return (
        scrape.get("vllm_batch_engine_loaded", model=model) == 1
        and not scrape.get("vllm_batch_lines_completed_total", model=model)
        and scrape.get("vllm_batch_lines_failed_total", model=model) >= 1
    )


@dataclass
class Runs:
    chat: Run
    embeddings: Run
    score: Run
    metrics_url: str


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    minilm_model: Path,
    cross_encoder_model: Path,
) -> Iterator[Runs]:
    folder = tmp_path_factory.mktemp("parity")
    port = free_port()
    score_text = "\n".join(
        [vllm.INPUT_SCORE_BATCH, vllm.INPUT_RERANK_BATCH, *map(json.dumps, OUR_SCORE_LINES)]
    )
    # One run at a time: three engines at once peak at ~10 GB and starve the other
    # xdist worker's engines on a 2-core machine.
    gate = Gate(folder / "gate")
    gate.allow(0)  # the two requests wait until a scrape has caught the run mid-way
    chat = start(
        folder,
        "chat",
        f"{vllm.CHAT_MODEL_NAME}={tiny_model}",
        vllm.INPUT_BATCH,
        *("--enable-metrics", "--port", str(port)),
        gate=gate,
    )
    started = [chat]
    try:
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        scrape_while_running(chat, metrics_url, gate, vllm.CHAT_MODEL_NAME)
        chat.wait()
        embeddings = start(
            folder,
            "embeddings",
            f"{vllm.EMBEDDING_MODEL_NAME}={minilm_model}",
            vllm.INPUT_EMBEDDING_BATCH,
        )
        started.append(embeddings)
        embeddings.wait()
        score = start(
            folder, "score", f"{vllm.RERANKER_MODEL_NAME}={cross_encoder_model}:score", score_text
        )
        started.append(score)
        score.wait()
        yield Runs(chat, embeddings, score, metrics_url)
    finally:
        for run in started:
            if run.process.poll() is None:
                run.process.kill()


def validated(run: Run) -> list[tuple[Any, dict[str, Any]]]:
    """Each output line as vLLM's ``BatchRequestOutput`` (which must accept it) and as JSON."""
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    return [
        (BatchRequestOutput.model_validate_json(line), json.loads(line)) for line in run.lines()
    ]


def vllm_file_results(
    run: Run, count: int, ok: int, body_type: type, model: str
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """A run of one of vLLM's files (lines ``request-1`` to ``request-{count}``): the
    bodies of the first ``ok`` lines (successes of ``body_type`` for ``model``), and the
    other lines (errors) as JSON by ``custom_id``."""
    lines = validated(run)
    assert [parsed.custom_id for parsed, _ in lines] == [
        f"request-{i}" for i in range(1, count + 1)
    ]
    bodies = []
    for parsed, _ in lines[:ok]:
        body = parsed.response.body
        assert isinstance(body, body_type) and parsed.error is None
        assert body.model == model
        bodies.append(body)
    return bodies, {raw["custom_id"]: raw for _, raw in lines[ok:]}


def test_chat_file(runs: Runs) -> None:
    """vLLM's ``test_completions``: exit 0, every line a ``BatchRequestOutput``."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    bodies, errors = vllm_file_results(
        runs.chat, 5, 2, ChatCompletionResponse, vllm.CHAT_MODEL_NAME
    )
    for body in bodies:
        assert 0 < body.usage.completion_tokens <= 1000  # sampled: EOS may come early
        assert body.choices[0].finish_reason in ("length", "stop")
    assert [errors[f"request-{i}"]["response"]["status_code"] for i in (3, 4, 5)] == [404, 400, 400]
    assert "NonExistModel" in errors["request-3"]["error"]["error"]["message"]
    assert "/bad_url" in errors["request-4"]["error"]["error"]["message"]
    assert "Streaming is not supported" in errors["request-5"]["error"]["error"]["message"]


def test_metrics_are_served_while_the_run_lasts(runs: Runs) -> None:
    model = vllm.CHAT_MODEL_NAME
    assert runs.chat.scrapes, runs.chat.log.read_text()[-3000:]
    loaded = [s for s in runs.chat.scrapes if s.get("vllm_batch_engine_loaded", model=model) == 1]
    assert loaded, "no scrape saw the engine loaded"
    # Served mid-run (the two requests held by the gate), counting the failed line live.
    assert any(mid_run(s, model) for s in loaded), "no scrape in the middle of the run"
    with pytest.raises(httpx.ConnectError):  # the endpoint ends with the run
        httpx.get(runs.metrics_url, timeout=5)


def test_invalid_file_exits_non_zero(tmp_path: Path, tiny_model: Path) -> None:
    """vLLM's ``test_completions_invalid_input``: a line without ``custom_id`` fails the run."""
    run = start(
        tmp_path, "invalid", f"{vllm.CHAT_MODEL_NAME}={tiny_model}", vllm.INVALID_INPUT_BATCH
    )
    assert run.wait() == 2
    assert "line 1: missing required field(s) 'custom_id'" in run.log.read_text()
    assert not run.output.exists()


def test_embeddings_file(runs: Runs) -> None:
    """vLLM's ``test_embeddings``: exit 0, every line a ``BatchRequestOutput``."""
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse

    bodies, errors = vllm_file_results(
        runs.embeddings, 4, 3, EmbeddingResponse, vllm.EMBEDDING_MODEL_NAME
    )
    assert [[len(d.embedding) for d in body.data] for body in bodies] == [[384]] * 3
    missing = errors["request-4"]
    assert missing["response"]["status_code"] == 404
    assert "NonExistModel" in missing["error"]["error"]["message"]


@pytest.fixture(scope="module")
def reference(cross_encoder_model: Path) -> Callable[[str, list[str]], list[float]]:
    return lambda query, documents: cross_encoder_scores(cross_encoder_model, query, documents)


def test_score_and_rerank_files(
    runs: Runs, reference: Callable[[str, list[str]], list[float]]
) -> None:
    """vLLM's ``test_score`` (both files): exit 0, every line a ``BatchRequestOutput`` with
    no ``error``; here also the scores of a cross-encoder, against transformers."""
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    lines = validated(runs.score)
    theirs, ours = lines[:5], {raw["custom_id"]: raw for _, raw in lines[5:]}
    assert all(parsed.error is None and raw["error"] is None for parsed, raw in theirs)
    query = "What is the capital of France?"
    expected = reference(query, vllm.SCORE_RERANK_DOCUMENTS)
    assert expected[1] > expected[0]  # the random model still tells the two apart
    for parsed, _ in theirs[:2]:  # /score and /v1/score
        body = parsed.response.body
        assert isinstance(body, ScoreResponse) and body.model == vllm.RERANKER_MODEL_NAME
        assert [d.index for d in body.data] == [0, 1]
        assert [d.score for d in body.data] == pytest.approx(expected, rel=1e-4)
    for parsed, _ in theirs[2:]:  # /rerank, /v1/rerank, /v2/rerank
        body = parsed.response.body
        assert isinstance(body, RerankResponse) and body.usage.prompt_tokens > 0
        assert [r.index for r in body.results] == [1, 0]  # best first
        assert [r.relevance_score for r in body.results] == pytest.approx(expected[::-1], rel=1e-4)
        assert body.results[0].document.text == vllm.SCORE_RERANK_DOCUMENTS[1]

    assert ours["no-query"]["response"]["status_code"] == 400
    no_query = ours["no-query"]["error"]["error"]
    assert no_query["param"] == "query" and "Field required" in no_query["message"]
    for name, url in (
        ("embeddings-on-cross-encoder", "/v1/embeddings"),
        ("chat-on-cross-encoder", "/v1/chat/completions"),
    ):
        assert ours[name]["response"]["status_code"] == 400, ours[name]
        assert f"does not support {url}" in ours[name]["error"]["error"]["message"]
