"""``LineResult``: one finished input line, as the pipeline hands it to its consumer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LineResult:
    """A finished input line: its output or error line and its token usage."""

    line: int
    is_error: bool
    data: str
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    seconds: float | None = None
    """How long the engine took (retries included); None if the line never reached it."""
