"""What the worker needs from an inference engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class EngineFailure(Exception):
    """The engine itself broke (died, lost its GPU): the work must be retried, not failed."""


@dataclass(frozen=True)
class EngineResult:
    """The outcome of one request: a 200 body, or an HTTP-style error."""

    status_code: int
    body_json: str
    """The response body (a ChatCompletion / Completion, or an ``{"error": ...}`` object)."""
    error_code: str | None = None
    error_message: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status_code == 200


class Engine(Protocol):
    """Serves one model for the OpenAI endpoints it supports."""

    model_name: str

    @property
    def max_in_flight(self) -> int:
        """How many requests to keep submitted to saturate the engine."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        """Run one request; per-request problems are results, engine breakage raises."""
        ...
