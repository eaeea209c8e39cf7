"""The worker's claim loop: lease a chunk, run it, finalize batches, repeat."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from vllm_batch.engines.base import EngineFailure
from vllm_batch.store import queries
from vllm_batch.store.models import ChunkRow
from vllm_batch.worker.chunk import ChunkOutcome, run_chunk
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.finalize import finalize_batch

log = logging.getLogger(__name__)
T = TypeVar("T")
ENGINE_RETRY_SECONDS = 2.0


class Worker:
    """Claims chunks for the models it serves until ``shutdown`` is set."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.current_chunk: str | None = None
        self.chunks_done = 0

    async def run(self, shutdown: asyncio.Event) -> None:
        models = ", ".join(self.ctx.engines.model_names)
        log.info("worker %s serving %s", self.ctx.worker_id, models)
        await self._guarded(self.ctx.engines.get(self.ctx.engines.model_names[0]))
        while not shutdown.is_set():
            chunk = await self._guarded(self.claim())
            if chunk is None:
                await self.ctx.notifier.wait(self.ctx.settings.poll_interval)
                continue
            await self.process(chunk, shutdown)
        log.info("worker %s stopped", self.ctx.worker_id)

    async def _guarded(self, work: Awaitable[T]) -> T | None:
        """Database hiccups must not kill the loop: log and try again next round."""
        try:
            return await work
        except Exception:
            log.exception("worker %s: housekeeping/claim failed", self.ctx.worker_id)
            await asyncio.sleep(self.ctx.settings.poll_interval)
            return None

    async def claim(self) -> ChunkRow | None:
        """Prefer the loaded model (no swap), then any model this worker serves."""
        loaded = self.ctx.engines.loaded_model
        preferences = [[loaded]] if loaded else []
        preferences.append(self.ctx.engines.model_names)
        for models in preferences:
            async with self.ctx.sessions() as session, session.begin():
                chunk = await queries.claim_chunk(
                    session,
                    owner=self.ctx.worker_id,
                    models=models,
                    now=time.time(),
                    lease=self.ctx.settings.lease_seconds,
                )
            if chunk is not None:
                return chunk
        return None

    async def process(self, chunk: ChunkRow, shutdown: asyncio.Event) -> None:
        self.current_chunk = chunk.id
        log.info(
            "worker %s took chunk %s (lines %d-%d, attempt %d)",
            self.ctx.worker_id,
            chunk.id,
            chunk.start_line,
            chunk.end_line,
            chunk.attempts,
        )
        try:
            outcome = await run_chunk(self.ctx, chunk, shutdown)
        except EngineFailure as exc:
            log.error("engine failed on chunk %s: %s; restarting it", chunk.id, exc)
            await self._release(chunk)
            await self.ctx.engines.restart()
            await asyncio.sleep(ENGINE_RETRY_SECONDS)
            return
        except Exception:
            log.exception("chunk %s failed unexpectedly; releasing it", chunk.id)
            await self._release(chunk)
            await asyncio.sleep(ENGINE_RETRY_SECONDS)
            return
        finally:
            self.current_chunk = None
        if outcome is ChunkOutcome.DONE:
            async with self.ctx.sessions() as session, session.begin():
                saved = await queries.count_done_lines(
                    session, chunk.batch_id, chunk.start_line, chunk.end_line
                )
                if saved == chunk.end_line - chunk.start_line:
                    await queries.finish_chunk(session, chunk.id, self.ctx.worker_id)
                    self.chunks_done += 1
                else:  # never mark a chunk done with a line missing
                    log.error(
                        "chunk %s has %d of %d results; releasing it",
                        chunk.id,
                        saved,
                        chunk.end_line - chunk.start_line,
                    )
                    await queries.release_chunk(session, chunk.id, self.ctx.worker_id)
        elif outcome is ChunkOutcome.RELEASED:
            await self._release(chunk)
        await finalize_batch(self.ctx, chunk.batch_id)

    async def _release(self, chunk: ChunkRow) -> None:
        async with self.ctx.sessions() as session, session.begin():
            await queries.release_chunk(session, chunk.id, self.ctx.worker_id)
