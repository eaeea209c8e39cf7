"""BENCHMARK ONLY: an engine that answers instantly, to measure the pipeline around it.

Never a default: selected only with ``--engine instant-benchmark``. It does no inference;
every response is the same tiny ChatCompletion/Completion with made-up token counts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from vllm_batch.engines.base import EngineResult


class InstantBenchmarkEngine:
    """Returns a canned response for every request, yielding to the loop once."""

    def __init__(self, model_name: str, max_in_flight: int = 512) -> None:
        self.model_name = model_name
        self._max_in_flight = max_in_flight

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
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "ok", "finish_reason": "stop"}
        )
        response = {
            "id": f"cmpl-{request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
        }
        return EngineResult(
            status_code=200,
            body_json=orjson.dumps(response).decode(),
            input_tokens=10,
            output_tokens=1,
        )
