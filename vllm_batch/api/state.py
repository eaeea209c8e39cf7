"""The services a running app holds, created by the lifespan and reached via ``deps``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.engines.manager import EngineManager
from vllm_batch.runtime import StoreContext
from vllm_batch.worker.loop import Worker

log = logging.getLogger(__name__)


@dataclass
class AppContext(StoreContext):
    engines: EngineManager | None = None
    worker: Worker | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keep a reference, log its failure."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
