"""Compatibility layer: handlers written for the original ``result_handlers`` layout run as is.

``from result_handlers import register_handler`` and
``from result_handlers.base import ResultHandler`` resolve to :mod:`vllm_batch.handlers`.
"""

from vllm_batch.handlers import ResultHandler, ResultHandlerRegistry, get_registry, register_handler

__all__ = ["ResultHandler", "ResultHandlerRegistry", "get_registry", "register_handler"]
