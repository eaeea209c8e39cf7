"""``vllm-batch run`` on embeddings, score and rerank files, on the session's pooling engine.

``run_batch`` is the command's whole body after argument parsing; it runs here in-process,
on its own event loop, with the session's MiniLM engine lent across loops (so no second
pooling engine starts). Output lines are checked with vLLM's own ``BatchRequestOutput``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MINILM_NAME, LoopThread, SharedEngine, pooling_settings
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.offline import RunFailed, RunOptions, run_batch


def request(custom_id: str, url: str, model: str = MINILM_NAME, **body: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, **body}}
    return json.dumps(line)


LINES = [
    request("emb-0", "/v1/embeddings", input="The cat sits on the mat."),
    request("emb-1", "/v1/embeddings", input=["one", "two"], encoding_format="base64"),
    request("score", "/v1/score", text_1="cat", text_2=["kitten", "stock market"]),
    request("rerank", "/v1/rerank", query="cat", documents=["kitten", "bonds"], top_n=1),
    request("unknown-model", "/v1/embeddings", model="nope", input="x"),
    request("chat", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}]),
    request("dims", "/v1/embeddings", input="x", dimensions=8),
]


def options(
    tmp_path: Path, minilm_model: Path, lines: list[str], **kwargs: Any
) -> tuple[RunOptions, Path]:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    spec = ModelSpec.parse(f"{MINILM_NAME}={minilm_model}")
    settings: Settings = pooling_settings(minilm_model)
    run_options = RunOptions(
        input=str(source), output=str(out), spec=spec, settings=settings, **kwargs
    )
    return run_options, out


def test_run_writes_vllm_batch_output_for_pooling_endpoints(
    tmp_path: Path, minilm_model: Path, pooling_engine: Any, loop_thread: LoopThread
) -> None:
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingResponse
    from vllm.entrypoints.pooling.scoring.protocol import RerankResponse, ScoreResponse

    run_options, out = options(tmp_path, minilm_model, LINES)
    summary = run_batch(
        run_options, engine_factory=lambda spec, s: SharedEngine(pooling_engine, loop_thread)
    )
    assert summary.total == len(LINES) and summary.errors == 3
    raw_lines = out.read_text().splitlines()
    parsed = [BatchRequestOutput.model_validate_json(raw) for raw in raw_lines]
    assert [p.custom_id for p in parsed] == [json.loads(x)["custom_id"] for x in LINES]
    by_id = {p.custom_id: p for p in parsed}

    embeddings = {}
    for name in ("emb-0", "emb-1"):
        response = by_id[name].response
        assert response is not None and response.status_code == 200
        assert isinstance(response.body, EmbeddingResponse), name
        embeddings[name] = [d.embedding for d in response.body.data]
    assert [len(e) for e in embeddings["emb-0"]] == [384]
    assert [type(e) for e in embeddings["emb-1"]] == [str, str]  # base64
    score = by_id["score"].response
    assert score is not None and isinstance(score.body, ScoreResponse)
    assert score.body.data[0].score > score.body.data[1].score
    rerank = by_id["rerank"].response
    assert rerank is not None and isinstance(rerank.body, RerankResponse)
    assert [r.document.text for r in rerank.body.results] == ["kitten"]

    # Error lines in vLLM's shape: response.body null, the ErrorResponse under "error".
    errors = {
        name: json.loads(raw_lines[i]) for i, name in ((4, "unknown"), (5, "chat"), (6, "dims"))
    }
    assert errors["unknown"]["response"]["status_code"] == 404
    assert errors["chat"]["response"]["status_code"] == 400
    assert "does not support /v1/chat/completions" in errors["chat"]["error"]["error"]["message"]
    dims = errors["dims"]["error"]["error"]
    assert dims["code"] == 400 and dims["param"] == "dimensions"
    assert "Matryoshka" in dims["message"]


def test_strict_run_rejects_a_line_of_the_wrong_kind(tmp_path: Path, minilm_model: Path) -> None:
    chat = request("c", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}])
    run_options, out = options(tmp_path, minilm_model, [chat], strict=True)

    class Idle(SharedEngine):
        def __init__(self) -> None:
            self.model_name = MINILM_NAME

        @property
        def max_in_flight(self) -> int:
            return 1

    with pytest.raises(RunFailed) as exc:
        run_batch(run_options, engine_factory=lambda spec, s: Idle())
    assert exc.value.exit_code == 2
    assert "line 1: The model 'minilm' is an embedding model" in exc.value.message
    assert not out.exists()


def test_cli_model_kind_suffix_reaches_the_strict_check(tmp_path: Path) -> None:
    """``--model NAME=PATH:embed`` with a path that has no model files: the kind given."""
    source = tmp_path / "in.jsonl"
    source.write_text(request("c", "/v1/chat/completions", model="e", messages=[]) + "\n")
    args = ["run", "-i", str(source), "-o", str(tmp_path / "o.jsonl"), "--strict"]
    args += ["--model", f"e={tmp_path / 'no-model'}:embed"]
    done = subprocess.run(
        [sys.executable, "-m", "vllm_batch.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "line 1: The model 'e' is an embedding model" in done.stderr
