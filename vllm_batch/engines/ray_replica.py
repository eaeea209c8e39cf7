"""The Ray actor behind ``RayEngine``: one of the project's own engines in a Ray worker.

The actor builds the same engine an in-process worker would (``make_engine`` with the
``local`` executor), so its results are the same bytes. It starts that engine on first
use, so an actor Ray restarted after its process died serves again without being told.
Engine failures cross the actor boundary as plain ``EngineFailure``/``EngineOutOfMemory``
(their vLLM causes need not unpickle in the caller's process).
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from typing import Any

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import (
    Engine,
    EngineFailure,
    EngineOutOfMemory,
    EngineResult,
    ResizableEngine,
)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a started replica tells the caller."""

    pid: int
    host: str
    max_in_flight: int
    max_num_seqs: int | None
    """None: its engine cannot resize (``ResizableEngine``)."""


def replica_settings(settings: Settings) -> Settings:
    """The settings a replica builds its engine from: in-process, without the caller's
    metrics (the replica's process serves none)."""
    return settings.model_copy(update={"executor": "local", "metrics_enabled": False})


class EngineReplica:
    """Holds one engine; Ray runs it as an async actor (``ray.remote(EngineReplica)``)."""

    def __init__(self, spec: ModelSpec, settings: Settings, max_num_seqs: int | None) -> None:
        from vllm_batch.engines import make_engine
        from vllm_batch.observability.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        self._engine: Engine = make_engine(spec, replica_settings(settings))
        if max_num_seqs is not None and isinstance(self._engine, ResizableEngine):
            self._engine.set_max_num_seqs(max_num_seqs)
        self._starting: asyncio.Task[None] | None = None

    async def start(self) -> ReplicaInfo:
        """Start the engine (once; later calls wait for the same start)."""
        if self._starting is None:
            self._starting = asyncio.create_task(self._engine.start())
        await asyncio.shield(self._starting)
        engine = self._engine
        seqs = engine.max_num_seqs if isinstance(engine, ResizableEngine) else None
        return ReplicaInfo(os.getpid(), socket.gethostname(), engine.max_in_flight, seqs)

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        await self.start()
        try:
            return await self._engine.run(url, body, request_id)
        except EngineOutOfMemory as exc:
            raise EngineOutOfMemory(str(exc)) from None
        except EngineFailure as exc:
            raise EngineFailure(str(exc)) from None

    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.wait([self._starting])
        await self._engine.stop()
