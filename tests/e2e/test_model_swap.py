"""One worker, two configured models: it claims work for either, swapping the loaded
model when the other has work (one engine at a time), and /ready shows which is loaded."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from openai import OpenAI

from tests.e2e.conftest import served
from tests.helpers import chat_line, jsonl, parse_jsonl, wait_for_batch


def wait_loaded(url: str, model: str, timeout: float = 10) -> str | None:
    """``/ready``'s loaded model once it is ``model``, or as it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (loaded := httpx.get(f"{url}/ready").json()["worker"]["loaded_model"]) != model:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return loaded


def test_worker_swaps_models_on_demand(tiny_model: Path, tmp_path: Path) -> None:
    from vllm_batch.weights.tiny import make_test_model

    other = make_test_model(tmp_path / "tiny-seed1", seed=1)
    args = [
        "--model",
        f"tiny-a={tiny_model}",
        "--model",
        f"tiny-b={other}",
        "--max-model-len",
        "512",
    ]
    for server in served(args, tmp_path / "data"):
        assert httpx.get(f"{server.url}/ready").json()["worker"]["loaded_model"] == "tiny-a"
        client = OpenAI(base_url=server.base_url, api_key="x")
        models = [m.id for m in client.models.list()]
        assert models == ["tiny-a", "tiny-b"]
        outputs = {}
        for model in ("tiny-a", "tiny-b"):  # the loaded one, then a swap
            lines = [chat_line(i, model, "Same question.") for i in range(4)]
            upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            final = wait_for_batch(client, batch.id, timeout=180)
            assert final.status == "completed" and final.model == model
            results = parse_jsonl(client.files.content(final.output_file_id).text)
            assert {r["response"]["body"]["model"] for r in results} == {model}
            outputs[model] = results[0]["response"]["body"]["choices"][0]["message"]["content"]
            # serve's worker process reports its status every STATUS_SECONDS (0.5 s)
            loaded = wait_loaded(server.url, model)
            assert loaded == model
        assert outputs["tiny-a"] != outputs["tiny-b"]  # really two different models
        log = server.log()
        assert "unloading model tiny-a" in log
