"""The built-in result handlers, configured from ``Settings`` (each enabled by its settings).

``webhook`` is not a class here: it is the dispatcher's own signed delivery.
"""

from __future__ import annotations

from vllm_batch.config import Settings
from vllm_batch.handlers.base import ResultHandler


def make_builtin_handlers(settings: Settings) -> list[ResultHandler]:
    from vllm_batch.handlers.label_studio import LabelStudioHandler
    from vllm_batch.handlers.postgres import PostgresHandler
    from vllm_batch.handlers.s3_copy import S3CopyHandler
    from vllm_batch.handlers.template import TemplateHandler

    return [
        LabelStudioHandler(settings),
        S3CopyHandler(settings),
        PostgresHandler(settings),
        TemplateHandler(settings),
    ]
