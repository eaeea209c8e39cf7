"""Small builders for batch files and a poller shared by the tests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

TERMINAL = {"completed", "failed", "cancelled", "expired"}


def chat_line(
    index: int, model: str, content: str | None = None, *, max_tokens: int = 8, **body: Any
) -> dict[str, Any]:
    return {
        "custom_id": f"request-{index}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": content or f"Tell me about number {index}."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **body,
        },
    }


def completion_line(
    index: int, model: str, prompt: str | None = None, *, max_tokens: int = 8
) -> dict[str, Any]:
    return {
        "custom_id": f"request-{index}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "model": model,
            "prompt": prompt or f"The story of {index} is",
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def wait_for_batch(
    client: Any,
    batch_id: str,
    timeout: float = 240,
    statuses: set[str] | frozenset[str] = frozenset(TERMINAL),
) -> Any:
    """Poll ``client.batches.retrieve`` until the batch reaches one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout}s")
        time.sleep(0.2)


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_options(tmp_path: Path, settings: Any, body: bytes, **kwargs: Any) -> tuple[Any, Path]:
    """``vllm-batch run`` options for the only model of ``settings``: the input ``body``
    (JSONL) is written to ``tmp_path/in.jsonl``, the output goes to ``tmp_path/out.jsonl``."""
    from vllm_batch.offline import RunOptions

    source = tmp_path / "in.jsonl"
    source.write_bytes(body)
    out = tmp_path / "out.jsonl"
    spec = settings.model_specs[0]
    options = RunOptions(input=str(source), output=str(out), spec=spec, settings=settings, **kwargs)
    return options, out


def submit(client: Any, lines: list[dict[str, Any]], endpoint: str) -> Any:
    """Upload ``lines`` and create a 24h batch for ``endpoint`` with the ``openai`` SDK."""
    upload = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id, endpoint=endpoint, completion_window="24h"
    )


def results(client: Any, file_id: str | None) -> dict[str, dict[str, Any]]:
    """An output or error file's lines by ``custom_id`` (empty without a file)."""
    if file_id is None:
        return {}
    return {r["custom_id"]: r for r in parse_jsonl(client.files.content(file_id).text)}


async def create_validating_batch(ctx: Any, body: bytes, lines: int) -> str:
    """Store ``body`` as a batch input file and create a ``validating`` batch reading it,
    as the API would (through ``lifecycle.create``); returns the batch id."""
    from vllm_batch.batches import lifecycle
    from vllm_batch.batches.store.rows import FileRow
    from vllm_batch.protocol.ids import new_id, now

    file_id = new_id("file-")
    key = f"files/{file_id}"
    with ctx.storage.open_write(key) as handle:
        handle.write(body)
    async with ctx.sessions() as session, session.begin():
        session.add(
            FileRow(
                id=file_id,
                bytes=len(body),
                created_at=now(),
                filename="in.jsonl",
                purpose="batch",
                storage_key=key,
                line_count=lines,
            )
        )
    spec = lifecycle.BatchSpec(
        endpoint="/v1/chat/completions",
        input_file_id=file_id,
        completion_window="24h",
        window_seconds=86400,
        metadata=None,
        priority=0,
        output_expires_after=None,
        owner=None,
    )
    return (await lifecycle.create(ctx, spec)).id


def whitespace_bias(model_dir: Any) -> dict[str, float]:
    """A ``logit_bias`` that bans every whitespace-only token of the model's tokenizer.

    JSON grammars allow any amount of whitespace between tokens, and a random-weight model
    (the tiny test model) fills its output with it until ``max_tokens``; without whitespace
    the same grammar ends in a few tokens, so every output can be checked whole.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {
        str(i): -100.0
        for i in range(len(tokenizer))
        if (text := tokenizer.decode([i])) and not text.strip()
    }


def cross_encoder_scores(model_dir: Any, query: str, documents: list[str]) -> list[float]:
    """What a one-label cross-encoder gives each (query, document) pair, computed with
    transformers alone: the sigmoid of its logit (what vLLM and sentence-transformers return)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer([query] * len(documents), documents, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**encoded).logits
    return [float(x) for x in torch.sigmoid(logits[:, 0])]
