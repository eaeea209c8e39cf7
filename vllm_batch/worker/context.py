"""What a worker's parts share: the store context plus its engines."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_batch.batches.store_context import StoreContext
from vllm_batch.engines.manager import EngineManager


@dataclass(kw_only=True)
class WorkerContext(StoreContext):
    engines: EngineManager

    @property
    def worker_id(self) -> str:
        return self.instance_id
