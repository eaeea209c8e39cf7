"""Compatibility: ``from result_handlers.base import ResultHandler``."""

from vllm_batch.handlers.base import ResultHandler, ResultHandlerRegistry

__all__ = ["ResultHandler", "ResultHandlerRegistry"]
