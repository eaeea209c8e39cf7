"""BENCHMARK ONLY: an engine that answers instantly, to measure the pipeline around it.

Never a default: selected only with ``--engine instant-benchmark``. It does no inference;
every response is the same tiny ChatCompletion/Completion with made-up token counts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from vllm_batch.engines.engine import EngineResult


class InstantBenchmarkEngine:
    """Returns a canned response for every request, yielding to the loop once.

    The response is spliced from pre-serialised parts (only its id and ``created`` vary),
    so the benchmark measures the pipeline rather than this engine's own JSON encoding.
    """

    def __init__(self, model_name: str, max_in_flight: int = 512) -> None:
        self.model_name = model_name
        self._max_in_flight = max_in_flight
        self._tails = {chat: self._tail(chat) for chat in (True, False)}

    def _tail(self, chat: bool) -> str:
        """Everything after ``created``: ``"model":...,"choices":...,"usage":...}``."""
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "ok", "finish_reason": "stop"}
        )
        rest = {
            "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
        return orjson.dumps(rest).decode()[1:]

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        await asyncio.sleep(0)
        chat = url == "/v1/chat/completions"
        response_id = orjson.dumps(f"cmpl-{request_id}").decode()
        kind = "chat.completion" if chat else "text_completion"
        return EngineResult(
            status_code=200,
            body_json=(
                f'{{"id":{response_id},"object":"{kind}","created":{int(time.time())},'
                f"{self._tails[chat]}"
            ),
            input_tokens=10,
            output_tokens=1,
        )
