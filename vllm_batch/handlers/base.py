"""The result-handler plugin interface, in the shape existing handlers were written for.

A handler runs once per batch that reaches a final status, through the delivery outbox:
retried with backoff, isolated from other handlers, every attempt recorded. ``handle`` may
be a plain or an ``async`` method; it runs in a worker thread (async ones in their own event
loop there), so it can block without slowing batch processing.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class ResultHandler(ABC):
    """Subclass, implement ``name``, ``enabled`` and ``handle``, then ``register_handler``."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}

    @abstractmethod
    def name(self) -> str:
        """A unique name, used in ``VLLM_BATCH_HANDLERS``, logs and ``/deliveries``."""

    @abstractmethod
    def enabled(self, metadata: dict[str, Any] | None = None) -> bool:
        """Whether to run for a batch with this metadata (e.g. required settings are set).

        Handlers that take no ``metadata`` argument are supported too.
        """

    @abstractmethod
    def handle(
        self, batch_id: str, results: Iterable[dict[str, Any]], metadata: dict[str, Any]
    ) -> bool | Awaitable[bool]:
        """Process the batch's result lines; True on success, False (or raise) to retry.

        ``results`` streams the parsed output lines, then the error lines, from storage:
        iterate it as often as needed; ``len(results)`` is the number of lines. It is a
        :class:`~vllm_batch.handlers.results.ResultStream`, whose ``batch`` attribute
        describes the batch (status, model, file ids). ``metadata`` is the batch's metadata.
        """

    def on_error(self, error: Exception) -> None:
        """Called when ``handle`` raises; the attempt is recorded and retried either way."""
        log.warning("result handler %s failed: %s", self.name(), error)


def call_enabled(handler: ResultHandler, metadata: dict[str, Any]) -> bool:
    """``handler.enabled(metadata)``, or ``enabled()`` for handlers written without it."""
    try:
        takes_metadata = bool(inspect.signature(handler.enabled).parameters)
    except (TypeError, ValueError):
        takes_metadata = True
    return bool(handler.enabled(metadata) if takes_metadata else handler.enabled())  # type: ignore[call-arg]


class ResultHandlerRegistry:
    """Handlers by name; a later registration under the same name replaces the earlier one."""

    def __init__(self) -> None:
        self._handlers: dict[str, ResultHandler] = {}

    @property
    def handlers(self) -> list[ResultHandler]:
        return list(self._handlers.values())

    def register(self, handler: ResultHandler) -> None:
        if not isinstance(handler, ResultHandler):
            raise TypeError(f"{handler!r} is not a ResultHandler instance")
        name = handler.name()
        if name in self._handlers and self._handlers[name] is not handler:
            log.info("result handler %s replaced by %r", name, handler)
        self._handlers[name] = handler

    def unregister(self, name: str) -> None:
        self._handlers.pop(name, None)

    def get(self, name: str) -> ResultHandler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return list(self._handlers)


_registry = ResultHandlerRegistry()


def get_registry() -> ResultHandlerRegistry:
    """The process-wide registry that ``register_handler`` adds to."""
    return _registry


def register_handler(handler: ResultHandler) -> None:
    """Make ``handler`` available to every batch that finishes in this process."""
    _registry.register(handler)
