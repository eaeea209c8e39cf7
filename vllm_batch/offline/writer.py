"""In-order output: results arrive in any order and are written as soon as their turn comes.

The reorder buffer holds only results that finished ahead of an earlier line; the
dispatcher's in-flight window (and its read-ahead block) bounds how many that can be.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, Generic, TypeVar

import orjson

from vllm_batch.store.queries import LineResult

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Releases items keyed by consecutive indices, in index order, starting at ``start``."""

    def __init__(self, start: int = 0) -> None:
        self.next_index = start
        self._pending: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, index: int, item: T) -> list[T]:
        """Add one item; return every item now ready, in order."""
        if index < self.next_index or index in self._pending:
            raise ValueError(f"index {index} was already added")
        self._pending[index] = item
        ready: list[T] = []
        while self.next_index in self._pending:
            ready.append(self._pending.pop(self.next_index))
            self.next_index += 1
        return ready


def vllm_error_line(data: str) -> str:
    """An error line in ``vllm run-batch``'s shape: ``response.body`` null, details in ``error``.

    The server writes OpenAI's shape (the error body under ``response.body``), which vLLM's
    ``BatchRequestOutput`` rejects; the status code, request id and error are kept.
    """
    line: Any = orjson.loads(data)
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict) or "error" not in body:
        return data
    response["body"] = None
    info, error = body["error"], line.get("error")
    if isinstance(info, dict) and isinstance(error, dict) and info.get("param") is not None:
        error.setdefault("param", info["param"])
    return orjson.dumps(line).decode()


class OrderedWriter:
    """Writes ``LineResult``s to ``handle`` in line order; ``add`` is the dispatcher callback."""

    def __init__(
        self,
        handle: BinaryIO,
        start: int = 0,
        on_result: Callable[[LineResult], None] | None = None,
    ) -> None:
        self.handle = handle
        self.buffer: ReorderBuffer[str] = ReorderBuffer(start)
        self.on_result = on_result
        self.written = 0
        self._dirty = False

    @property
    def next_index(self) -> int:
        return self.buffer.next_index

    def add(self, result: LineResult) -> None:
        if self.on_result is not None:
            self.on_result(result)
        data = vllm_error_line(result.data) if result.is_error else result.data
        ready = self.buffer.push(result.line, data)
        if ready:
            self.handle.write("".join(f"{line}\n" for line in ready).encode())
            self.written += len(ready)
            self._dirty = True

    def flush(self, *, sync: bool = False) -> None:
        """Hand written lines to the OS (they then survive the process being killed)."""
        if self._dirty:
            self.handle.flush()
            self._dirty = False
        if sync:
            os.fsync(self.handle.fileno())
