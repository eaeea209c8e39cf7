"""Which result handlers this process has: built-ins, ``VLLM_BATCH_HANDLER_MODULES`` and
entry points.

Handlers come from the built-ins, from modules named in ``VLLM_BATCH_HANDLER_MODULES``
(importing one runs its ``register_handler`` calls) and from the entry-point group
``vllm_batch.result_handlers`` (an instance, a ``ResultHandler`` subclass, or a factory).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler, get_registry

ENTRY_POINT_GROUP = "vllm_batch.result_handlers"


class HandlerConfigError(ValueError):
    """A handler module, entry point or name in the settings cannot be used."""


def builtin_handlers(settings: Settings) -> list[ResultHandler]:
    from vllm_batch.handlers.builtin import make_builtin_handlers

    try:
        return make_builtin_handlers(settings)
    except ValueError as exc:
        raise HandlerConfigError(f"built-in result handler settings: {exc}") from exc


def _as_handlers(obj: Any, source: str) -> list[ResultHandler]:
    if isinstance(obj, ResultHandler):
        return [obj]
    if isinstance(obj, type) and issubclass(obj, ResultHandler):
        return [obj()]
    if callable(obj):
        made = obj()
        items: Iterable[Any] = made if isinstance(made, list | tuple) else [made]
        handlers = [item for item in items if isinstance(item, ResultHandler)]
        if handlers:
            return handlers
    raise HandlerConfigError(f"{source} gives {obj!r}, not a ResultHandler")


def discover(settings: Settings) -> dict[str, ResultHandler]:
    """The built-ins for ``settings``, then every registered handler (which may replace one).

    Imports the handler modules and loads the entry points first; both register their
    handlers in the process-wide registry.
    """
    registry = get_registry()
    for module in settings.handler_modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise HandlerConfigError(
                f"VLLM_BATCH_HANDLER_MODULES: cannot import {module!r}: {exc}"
            ) from exc
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            for handler in _as_handlers(point.load(), f"entry point {point.name!r}"):
                registry.register(handler)
        except HandlerConfigError:
            raise
        except Exception as exc:
            raise HandlerConfigError(f"entry point {point.value!r} failed to load: {exc}") from exc
    found = {handler.name(): handler for handler in builtin_handlers(settings)}
    found.update((handler.name(), handler) for handler in registry.handlers)
    return found
