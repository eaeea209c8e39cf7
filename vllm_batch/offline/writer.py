"""In-order output: results arrive in any order and are written as soon as their turn comes.

The reorder buffer holds only results that finished ahead of an earlier line. It is bounded:
``OrderedWriter.horizon`` tells the dispatcher the highest line it may submit
(``next_index + max_buffered``), so a slow early line pauses reading and submitting instead
of letting every later result pile up behind it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO, Generic, TypeVar

from vllm_batch.pipeline.line_result import LineResult

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


DEFAULT_MAX_BUFFERED = 4096


class OrderedWriter:
    """Writes ``LineResult``s to ``handle`` in line order; ``add`` is the dispatcher callback.

    Pass ``horizon`` to the dispatcher: then at most ``max_buffered`` results wait in memory.
    """

    def __init__(
        self,
        handle: BinaryIO,
        start: int = 0,
        on_result: Callable[[LineResult], None] | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.handle = handle
        self.buffer: ReorderBuffer[str] = ReorderBuffer(start)
        self.on_result = on_result
        self.max_buffered = max_buffered
        self.peak_buffered = 0
        self.written = 0
        self._dirty = False

    @property
    def next_index(self) -> int:
        return self.buffer.next_index

    def horizon(self) -> int:
        """The highest line index that may be submitted without overflowing the buffer."""
        return self.buffer.next_index + self.max_buffered

    def add(self, result: LineResult) -> None:
        if self.on_result is not None:
            self.on_result(result)
        ready = self.buffer.push(result.line, result.data)
        self.peak_buffered = max(self.peak_buffered, len(self.buffer))
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
