"""Result handlers and webhooks: plugins that receive a batch's results once it is final.

Public API::

    from vllm_batch.handlers import ResultHandler, register_handler

    class MyHandler(ResultHandler):
        def name(self) -> str: return "my_handler"
        def enabled(self, metadata=None) -> bool: return True
        def handle(self, batch_id, results, metadata) -> bool:
            for result in results: ...
            return True

    register_handler(MyHandler())
"""

from vllm_batch.handlers.base import (
    ResultHandler,
    ResultHandlerRegistry,
    get_registry,
    register_handler,
)
from vllm_batch.handlers.results import BatchInfo, ResultStream, answer_text

__all__ = [
    "BatchInfo",
    "ResultHandler",
    "ResultHandlerRegistry",
    "ResultStream",
    "answer_text",
    "get_registry",
    "register_handler",
]
