"""The built-in result handlers, configured from ``Settings``."""

from __future__ import annotations

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler


def make_builtin_handlers(settings: Settings) -> list[ResultHandler]:
    return []
