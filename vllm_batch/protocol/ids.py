"""Object ids: OpenAI-style prefixes with a time-ordered body, so ids sort by creation."""

from __future__ import annotations

import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix`` + 13 hex digits of microseconds + 8 random hex digits."""
    return f"{prefix}{time.time_ns() // 1000:013x}{secrets.token_hex(4)}"


def now() -> int:
    """Unix seconds, as every ``*_at`` field on the wire."""
    return int(time.time())
