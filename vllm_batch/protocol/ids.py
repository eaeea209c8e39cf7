"""Object ids: OpenAI-style prefixes with a time-ordered body, so ids sort by creation."""

from __future__ import annotations

import random
import secrets
import time


def new_id(prefix: str) -> str:
    """``prefix`` + 13 hex digits of microseconds + 8 random hex digits."""
    return f"{prefix}{time.time_ns() // 1000:013x}{secrets.token_hex(4)}"


def first_id_at(prefix: str, t: float) -> str:
    """The smallest ``new_id(prefix)`` made at or after Unix time ``t`` (ids sort by time)."""
    return f"{prefix}{max(0, int(t * 1_000_000)):013x}"


def now() -> int:
    """Unix seconds, as every ``*_at`` field on the wire."""
    return int(time.time())


def new_line_id(prefix: str) -> str:
    """An id like ``new_id``'s for output lines (one per request, never looked up).

    Its random part comes from ``random`` (reseeded in every forked process), not the
    OS's random source: one system call per output line was a visible share of the
    pipeline's time. Object ids that identify something use ``new_id``.
    """
    return f"{prefix}{time.time_ns() // 1000:013x}{random.getrandbits(32):08x}"
