"""Realistic batch output and error files for the result-handler tests, with what each line
should turn into (worked out here from the inputs, not by parsing the files back).

Lines come from the server's own writers (``result_line``/``failure_line``), with answers
full of CSV/Markdown/SQL trouble: commas, quotes, newlines, CRLF, pipes, unicode, NUL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from vllm_batch.engines.engine import EngineResult
from vllm_batch.handlers.results import BatchInfo, ResultStream
from vllm_batch.pipeline.output import ErrorShape, failure_line, result_line
from vllm_batch.storage.blob import BlobStorage

MODEL = "tiny-llama"
ANSWERS = [
    "Plain answer.",
    "Commas, \"double quotes\", and 'single' ones, too",
    "Line one\nLine two\n\nLine four",
    "Windows\r\nline endings\r\n",
    "Unicode: héllo wörld — 日本語 — emoji 🚀 — RTL שלום — combining e\u0301",
    "  leading and trailing spaces  ",
    "",
    "Pipes | and backslashes \\ and\ttabs; DROP TABLE x; --",
    "NUL \x00 inside",
    'Ends with a quote"',
]
TRICKY_IDS = {1: 'req, "quoted", id', 4: "req-ünïcødé-✓", 7: "req'; DROP TABLE results; --"}


@dataclass(frozen=True)
class Expected:
    """What one result line means."""

    custom_id: str
    status: str  # succeeded / failed
    status_code: int | None
    answer: str | None
    usage: dict[str, int] | None


@dataclass
class BatchFiles:
    stream: ResultStream
    output: bytes
    errors: bytes | None
    expected: list[Expected] = field(default_factory=list)


def chat_body(answer: str, index: int, usage: dict[str, int]) -> str:
    return json.dumps(
        {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "created": 1_780_000_000 + index,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": usage,
        },
        ensure_ascii=index % 2 == 0,  # both escaped and raw unicode on disk
    )


def completion_body(text: str, usage: dict[str, int]) -> str:
    return json.dumps(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1_780_000_000,
            "model": MODEL,
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": usage,
        }
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def make_batch(
    storage: BlobStorage,
    batch_id: str,
    *,
    errors: bool = True,
    filler: int = 0,
    filler_size: int = 40,
) -> BatchFiles:
    """Write a batch's output (and error) file to ``storage``; ``filler`` adds plain lines."""
    out: list[str] = []
    expected: list[Expected] = []
    for index, answer in enumerate(ANSWERS):
        custom_id = TRICKY_IDS.get(index, f"request-{index}")
        usage = _usage(10 + index, 3 * index + 1)
        out.append(result_line(custom_id, EngineResult(200, chat_body(answer, index, usage)), "r"))
        expected.append(Expected(custom_id, "succeeded", 200, answer, usage))
    usage = _usage(4, 8)
    text = 'a completion, with "quotes" and a\nnewline'
    out.append(result_line("completion-1", EngineResult(200, completion_body(text, usage)), "r"))
    expected.append(Expected("completion-1", "succeeded", 200, text, usage))
    for index in range(filler):
        answer = f"filler {index}: " + "lorem ipsum, dolor " * filler_size
        usage = _usage(index, filler_size)
        custom_id = f"filler-{index}"
        out.append(result_line(custom_id, EngineResult(200, chat_body(answer, index, usage)), "r"))
        expected.append(Expected(custom_id, "succeeded", 200, answer, usage))

    err: list[str] = []
    if errors:
        bad = EngineResult(
            400,
            json.dumps({"error": {"message": 'max_tokens, "too" large', "code": 400}}),
            error_code="invalid_request_error",
            error_message='max_tokens, "too" large',
        )
        err.append(result_line("bad-1", bad, "r"))
        expected.append(Expected("bad-1", "failed", 400, None, None))
        err.append(failure_line("bad-2", "model_not_found", "model 'gpt, \"x\"' not found\n!"))
        expected.append(Expected("bad-2", "failed", None, None, None))
        crash = EngineResult(500, "{}", error_code="internal_error", error_message="ünïcødé boom")
        err.append(result_line("bad-3", crash, "r", shape=ErrorShape.VLLM))
        expected.append(Expected("bad-3", "failed", 500, None, None))

    output = "".join(line + "\n" for line in out).encode()
    output_key = f"files/file-out-{batch_id}"
    with storage.open_write(output_key) as handle:
        handle.write(output)
    error_bytes: bytes | None = None
    error_key: str | None = None
    if err:
        error_bytes = "".join(line + "\n" for line in err).encode()
        error_key = f"files/file-err-{batch_id}"
        with storage.open_write(error_key) as handle:
            handle.write(error_bytes)
    batch = BatchInfo(
        id=batch_id,
        status="completed",
        endpoint="/v1/chat/completions",
        model=MODEL,
        metadata={"project": 'sinks, "tests"'},
        output_file_id=f"file-out-{batch_id}",
        error_file_id=f"file-err-{batch_id}" if error_key else None,
        output_key=output_key,
        error_key=error_key,
        request_counts={"total": len(expected), "completed": len(out), "failed": len(err)},
    )
    return BatchFiles(ResultStream(storage, batch), output, error_bytes, expected)
