"""What the worker needs from an inference engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

CUDA_OOM_MESSAGE = "cuda out of memory"


class EngineFailure(Exception):
    """The engine itself broke (died, lost its GPU): the work must be retried, not failed."""


class EngineOutOfMemory(EngineFailure):
    """CUDA ran out of memory: retry the work with a smaller window, never fail its lines."""


def is_cuda_oom(exc: BaseException | None) -> bool:
    """``exc`` (or an exception it was raised from) is a CUDA out-of-memory error.

    Matches ``torch.cuda.OutOfMemoryError`` by name (torch is not imported) and any error
    whose message says "CUDA out of memory", as PyTorch and vLLM phrase it.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EngineOutOfMemory) or is_oom_message(str(exc)):
            return True
        if any(
            c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch")
            for c in type(exc).__mro__
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_oom_message(message: str | None) -> bool:
    return message is not None and CUDA_OOM_MESSAGE in message.lower()


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


@runtime_checkable
class ResizableEngine(Protocol):
    """An engine whose scheduler batch (``max_num_seqs``) can be set before ``start``."""

    @property
    def max_num_seqs(self) -> int: ...

    def set_max_num_seqs(self, value: int) -> None:
        """Use at most ``value`` sequences per scheduler step from the next ``start`` on."""
        ...


DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's default scheduler batch, until the engine reports its own."""


class MaxNumSeqs:
    """A ``ResizableEngine``'s bookkeeping: the scheduler batch now, and the cap that the
    next ``start`` uses (set after a CUDA out-of-memory error)."""

    def __init__(self, configured: int | None) -> None:
        self._max_num_seqs = configured or DEFAULT_MAX_NUM_SEQS
        self._max_num_seqs_cap: int | None = None

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    def set_max_num_seqs(self, value: int) -> None:
        """Start (next ``start``) with at most ``value`` sequences per scheduler step."""
        self._max_num_seqs_cap = value
        self._max_num_seqs = min(self._max_num_seqs, value)
