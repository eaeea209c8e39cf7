"""What a worker's parts share: the store context plus its engines."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_batch.engines.manager import EngineManager
from vllm_batch.runtime import StoreContext


@dataclass(kw_only=True)
class WorkerContext(StoreContext):
    engines: EngineManager

    @property
    def worker_id(self) -> str:
        return self.instance_id
