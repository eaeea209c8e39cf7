"""The worker's claim loop: lease a chunk, run it, finalize batches, repeat.

The loop must outlive every fault short of ``shutdown``:

- each database call (claim, finish or release a chunk, finalize) goes through
  ``retry_db``: an outage is waited out with backoff, not turned into an exit;
- anything else unexpected in one round is logged, and the loop goes on after a pause;
- a model whose engine cannot load is not claimed for while its load is retried with
  backoff (``EngineManager``); a chunk already held is handed back, never failed;
- while the GPU guard says a GPU is too hot or thermal-throttled, no new chunk is claimed
  (the running one finishes);
- a CUDA out-of-memory error halves the in-flight window and ``max_num_seqs`` (restarting
  the engine) and hands the chunk back without counting an engine failure; only at the
  floors does an OOM count toward ``max_chunk_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from vllm_batch import lifecycle
from vllm_batch.engines.base import EngineFailure, EngineOutOfMemory
from vllm_batch.engines.manager import EngineLoadError
from vllm_batch.logs import bound
from vllm_batch.observability import metrics
from vllm_batch.observability.gpu import NvmlReader
from vllm_batch.observability.gpu_guard import GpuGuard
from vllm_batch.store.models import ChunkRow
from vllm_batch.worker.chunk import ChunkOutcome, run_chunk
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.db_retry import Backoff, DbHealth, retry_db
from vllm_batch.worker.finalize import finalize_batch

log = logging.getLogger(__name__)
T = TypeVar("T")
ENGINE_RETRY_SECONDS = 2.0
ERROR_PAUSE_SECONDS = 2.0


class Worker:
    """Claims chunks for the models it serves until ``shutdown`` is set."""

    def __init__(self, ctx: WorkerContext, gpu: GpuGuard | None = None) -> None:
        self.ctx = ctx
        self.gpu = gpu or GpuGuard(NvmlReader(), ctx.settings)
        """Pauses claims while a GPU is too hot; its ``state()`` is shown on ``/ready``."""
        self.current_chunk: str | None = None
        self.chunks_done = 0
        self.db = DbHealth()
        self.db_backoff = Backoff()
        self.errors = 0
        """Rounds that ended in an unexpected error (logged, then the loop went on)."""
        self._shutdown = asyncio.Event()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Loop until ``shutdown``; returns only then. Log lines carry ``worker``."""
        with bound(worker=self.ctx.worker_id):
            await self._run(shutdown)

    async def _run(self, shutdown: asyncio.Event) -> None:
        self._shutdown = shutdown
        models = ", ".join(self.ctx.engines.model_names)
        log.info("worker %s serving %s", self.ctx.worker_id, models)
        await self.gpu.refresh()
        poller = asyncio.create_task(self.gpu.run(shutdown))
        try:
            await self._try_load(self.ctx.engines.model_names[0])
            while not shutdown.is_set():
                try:
                    await self.step()
                except Exception:
                    self.errors += 1
                    log.exception("worker %s: unexpected error; going on", self.ctx.worker_id)
                    await self._pause(ERROR_PAUSE_SECONDS)
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        log.info("worker %s stopped", self.ctx.worker_id)

    async def step(self) -> None:
        """One round: retry due engine loads, then claim and run one chunk (or wait)."""
        for model in self.ctx.engines.due_retries():
            await self._try_load(model)
        if self.gpu.paused:  # too hot: claim nothing until the guard resumes
            await self._pause(self.ctx.settings.poll_interval)
            return
        if not self.ctx.engines.claimable_models():
            wait = self.ctx.engines.next_retry_in()
            await self._pause(wait if wait is not None else self.ctx.settings.poll_interval)
            return
        chunk = await self._db(self.claim, "claim a chunk")
        if chunk is None:
            wait = self.ctx.settings.poll_interval
            next_retry = self.ctx.engines.next_retry_in()
            if next_retry is not None:
                wait = min(wait, max(next_retry, 0.05))
            await self.ctx.notifier.wait(wait)
            return
        await self.process(chunk)

    async def _try_load(self, model: str) -> None:
        """Load ``model`` now; a failure is recorded by the manager (and retried later)."""
        with contextlib.suppress(EngineLoadError):
            await self.ctx.engines.get(model)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._shutdown.wait(), seconds)

    async def _db(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_db(
            call, what, shutdown=self._shutdown, health=self.db, backoff=self.db_backoff
        )

    async def claim(self) -> ChunkRow | None:
        """Prefer the loaded model (no swap), then any model this worker may load."""
        claimable = self.ctx.engines.claimable_models()
        loaded = self.ctx.engines.loaded_model
        preferences = [[loaded]] if loaded in claimable else []
        preferences.append(claimable)
        for models in preferences:
            chunk = await lifecycle.claim_chunk(self.ctx, self.ctx.worker_id, models)
            if chunk is not None:
                return chunk
        return None

    async def process(self, chunk: ChunkRow) -> None:
        """Run a leased chunk, then mark it done or hand it back, then try to finalize."""
        with bound(worker=self.ctx.worker_id, batch_id=chunk.batch_id, chunk_id=chunk.id):
            ran = await self._process(chunk)
        if ran:
            await self._db(lambda: finalize_batch(self.ctx, chunk.batch_id), "finalize a batch")

    async def _process(self, chunk: ChunkRow) -> bool:
        """Whether the chunk ran (done or handed back) rather than failed."""
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
            outcome = await run_chunk(self.ctx, chunk, self._shutdown)
        except EngineLoadError as exc:
            log.error("chunk %s waits: %s; releasing it", chunk.id, exc)
            await self._release(chunk, "engine_unavailable")
            return False
        except EngineOutOfMemory as exc:
            await self._back_off_oom(chunk, exc)
            return False
        except EngineFailure as exc:
            log.error("engine failed on chunk %s: %s; restarting it", chunk.id, exc)
            await self._release(chunk, "engine_failure")
            await self.ctx.engines.restart()
            await self._pause(ENGINE_RETRY_SECONDS)
            return False
        except Exception:
            log.exception("chunk %s failed unexpectedly; releasing it", chunk.id)
            await self._release(chunk, "error")
            await self._pause(ERROR_PAUSE_SECONDS)
            return False
        finally:
            self.current_chunk = None
        if outcome is ChunkOutcome.DONE:
            if await self._db(lambda: self._finish(chunk), f"finish chunk {chunk.id}"):
                self.chunks_done += 1
                metrics.chunk_done(chunk.model)
            else:
                metrics.chunk_requeued(chunk.model, "incomplete")
        elif outcome is ChunkOutcome.RELEASED:
            await self._release(chunk, "stopped")
        return True

    async def _back_off_oom(self, chunk: ChunkRow, exc: EngineOutOfMemory) -> None:
        """Shrink the window and ``max_num_seqs``, then hand the chunk back to be retried."""
        settings = self.ctx.settings
        self.gpu.record_oom(chunk.model)
        step = await self.ctx.engines.shrink(
            chunk.model,
            min_in_flight=settings.oom_min_in_flight,
            min_num_seqs=settings.oom_min_num_seqs,
        )
        if step is None:
            log.error(
                "CUDA out of memory on chunk %s with the in-flight window and max_num_seqs "
                "at their floors (%d, %d): counting an engine failure: %s",
                chunk.id,
                settings.oom_min_in_flight,
                settings.oom_min_num_seqs,
                exc,
            )
            await self._release(chunk, "engine_failure")
            await self.ctx.engines.restart()
            await self._pause(ENGINE_RETRY_SECONDS)
            return
        changes = [
            f"{name} {change[0]} -> {change[1]}"
            for name, change in (
                ("in-flight window", step.in_flight),
                ("max_num_seqs", step.max_num_seqs),
            )
            if change is not None
        ]
        log.warning(
            "CUDA out of memory on chunk %s: %s%s; retrying the chunk",
            chunk.id,
            ", ".join(changes),
            " (engine restarts)" if step.restarted else "",
        )
        await self._release(chunk, "oom")

    async def _finish(self, chunk: ChunkRow) -> bool:
        """Mark ``chunk`` done if every line has a saved result, else hand it back."""
        done = await lifecycle.finish_chunk(self.ctx, chunk, self.ctx.worker_id)
        if not done:
            log.error("chunk %s is missing results or no longer ours; released it", chunk.id)
        return done

    async def _release(self, chunk: ChunkRow, reason: str) -> None:
        """Hand ``chunk`` back to the queue; ``reason`` is a ``chunk_requeues`` label."""
        released = await self._db(
            lambda: lifecycle.release_chunk(
                self.ctx,
                chunk,
                self.ctx.worker_id,
                engine_failure=reason == "engine_failure",
            ),
            f"release chunk {chunk.id}",
        )
        if released:
            metrics.chunk_requeued(chunk.model, reason)
