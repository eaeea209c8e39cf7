"""Keeps at most one engine loaded and swaps models on demand (one GPU at a time)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from vllm_batch.config import ModelSpec
from vllm_batch.engines.base import Engine

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec], Engine]


class EngineManager:
    """Owns the worker's engine; ``get`` loads the asked-for model, unloading another."""

    def __init__(self, specs: Sequence[ModelSpec], factory: EngineFactory) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()
        self.state = "idle"

    @property
    def model_names(self) -> list[str]:
        return list(self.specs)

    @property
    def loaded_model(self) -> str | None:
        return self._engine.model_name if self._engine and self.state == "ready" else None

    async def get(self, model: str) -> Engine:
        async with self._lock:
            if self._engine is not None and self._engine.model_name == model:
                return self._engine
            await self._unload()
            engine = self._factory(self.specs[model])
            self.state = f"loading {model}"
            try:
                await engine.start()
            except BaseException:
                self.state = "failed"
                raise
            self._engine = engine
            self.state = "ready"
            log.info("model %s loaded", model)
            return engine

    async def restart(self) -> None:
        """Drop the current engine (it broke); the next ``get`` starts a fresh one."""
        async with self._lock:
            await self._unload()

    async def close(self) -> None:
        async with self._lock:
            await self._unload()

    async def _unload(self) -> None:
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        self.state = "idle"
        log.info("unloading model %s", engine.model_name)
        try:
            await engine.stop()
        except Exception:
            log.exception("error while stopping the engine for %s", engine.model_name)
