"""The worker's claim loop: lease chunks, run them, finalize batches, repeat.

A worker holds up to ``max_chunks_in_flight`` chunks of one model at once, all feeding one
``FairWindow`` over the engine's in-flight window:

- **continuous feed**: when the lines left in its chunks fall below the window, it claims
  the next chunk, so one chunk's tail overlaps the next one's head and small batches
  share the engine instead of each draining it;
- **fairness**: while busy, it still takes a chunk of any batch it holds nothing of (woken
  by new work), and the window interleaves chunks weighted by priority, earliest deadline
  first, so a small batch never waits for a large one to finish;
- **model switches**: with several models, it stays on the loaded one unless another
  model's work has waited ``model_max_wait`` with nothing running; then it drains and
  switches.

The loop must outlive every fault short of ``shutdown``:

- each database call (claim, finish or release a chunk, finalize) goes through
  ``retry_db``: an outage is waited out with backoff, not turned into an exit;
- anything else unexpected in one round is logged, and the loop goes on after a pause;
- a model whose engine cannot load is not claimed for while its load is retried with
  backoff (``EngineManager``); a chunk already held is handed back, never failed;
- while the GPU guard says a GPU is too hot or thermal-throttled, no new chunk is claimed
  (the running ones finish);
- an engine failure hands back every chunk held, restarts the engine once, and runs one
  chunk at a time until one succeeds (a poison line then fails only its own chunk);
- a CUDA out-of-memory error halves the in-flight window and ``max_num_seqs`` (restarting
  the engine) and hands the chunks back without counting an engine failure; only at the
  floors does an OOM count toward ``max_chunk_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from vllm_batch.batches import lifecycle
from vllm_batch.batches.finalize import finalize_batch
from vllm_batch.batches.states import ChunkStatus, IllegalTransition
from vllm_batch.batches.store.db_retry import Backoff, DbHealth, retry_db
from vllm_batch.batches.store.rows import ChunkRow
from vllm_batch.engines.engine import Engine, EngineFailure, EngineOutOfMemory
from vllm_batch.engines.manager import EngineLoadError
from vllm_batch.observability import metrics
from vllm_batch.observability.gpu import NvmlReader
from vllm_batch.observability.gpu_guard import GpuGuard
from vllm_batch.observability.logs import bound
from vllm_batch.pipeline.window import FairWindow
from vllm_batch.worker.chunk import ChunkOutcome, ChunkRun
from vllm_batch.worker.context import WorkerContext

log = logging.getLogger(__name__)
T = TypeVar("T")
ENGINE_RETRY_SECONDS = 2.0
ERROR_PAUSE_SECONDS = 2.0
FLUSHES_AT_FULL_RATE = 4
PACE_SECONDS = 60.0
"""Finished lines over this many seconds give the worker's pace (seconds per line)."""


class Pace:
    """Seconds per finished line over the last ``PACE_SECONDS`` (0 until measured)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._marks: deque[tuple[float, int]] = deque()
        self._lines = 0

    def add(self, lines: int = 1) -> None:
        self._lines += lines
        now = self._clock()
        if not self._marks or now - self._marks[-1][0] >= 1.0:
            self._marks.append((now, self._lines))
        while len(self._marks) > 2 and now - self._marks[1][0] > PACE_SECONDS:
            self._marks.popleft()

    def seconds_per_line(self) -> float:
        if len(self._marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._marks[0], (self._clock(), self._lines)
        return (t1 - t0) / (n1 - n0) if n1 > n0 else 0.0


@dataclass
class _Held:
    run: ChunkRun
    task: asyncio.Task[None]


class _EngineTrouble:
    """An engine failure or out-of-memory error seen while several chunks were running."""

    def __init__(self, model: str, error: BaseException) -> None:
        self.model = model
        self.error = error


class Worker:
    """Claims chunks for the models it serves until ``shutdown`` is set."""

    def __init__(self, ctx: WorkerContext, gpu: GpuGuard | None = None) -> None:
        self.ctx = ctx
        self.gpu = gpu or GpuGuard(NvmlReader(), ctx.settings)
        """Pauses claims while a GPU is too hot; its ``state()`` is shown on ``/ready``."""
        self.held: dict[str, _Held] = {}
        """Chunks running now, by id."""
        self.chunks_done = 0
        self.db = DbHealth()
        self.db_backoff = Backoff()
        self.errors = 0
        """Rounds that ended in an unexpected error (logged, then the loop went on)."""
        self.pace = Pace()
        self._shutdown = asyncio.Event()
        self._wake = asyncio.Event()
        self._window: FairWindow | None = None
        self._window_engine: Engine | None = None
        self._trouble: _EngineTrouble | None = None
        self._one_at_a_time = False
        """After an engine failure: hold one chunk at a time until one finishes cleanly."""
        self._switching_to: str | None = None
        """A starved model this worker drains its current one for."""
        self._next_starvation_check = 0.0
        self._queue_dry = False
        """The last claim found nothing: finished lines stop waking the loop to claim (the
        poll interval, new work or a chunk's end still do)."""

    @property
    def current_chunk(self) -> str | None:
        """The first chunk held (``/ready``'s ``current_chunk``), or None when idle."""
        return next(iter(self.held), None)

    @property
    def current_chunks(self) -> list[str]:
        return list(self.held)

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
            await self._drain()  # held chunks see the shutdown at their next heartbeat
        finally:
            for held in self.held.values():
                held.run.halt()
            await self._drain()
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        log.info("worker %s stopped", self.ctx.worker_id)

    async def step(self) -> None:
        """One round: retry due engine loads, recover the engine, claim a chunk or wait."""
        for model in self.ctx.engines.due_retries():
            if not self.held:
                await self._try_load(model)
        if self._trouble is not None:
            await self._recover()
            return
        if self.gpu.paused:  # too hot: claim nothing until the guard resumes
            await self._wait(self.ctx.settings.poll_interval)
            return
        if not self.ctx.engines.claimable_models():
            wait = self.ctx.engines.next_retry_in()
            await self._wait(wait if wait is not None else self.ctx.settings.poll_interval)
            return
        if self._wants_more():
            chunk = await self._db(self.claim, "claim a chunk")
            self._queue_dry = chunk is None
            if chunk is not None and self._trouble is not None:
                # The engine broke while we were claiming: this chunk would run on a dead
                # engine and be charged a failure that is not its own. Hand it back.
                await self._release(chunk, "stopped")
                return
            if chunk is not None:
                self._start(chunk)
                return
        wait = self.ctx.settings.poll_interval
        next_retry = self.ctx.engines.next_retry_in()
        if next_retry is not None:
            wait = min(wait, max(next_retry, 0.05))
        await self._wait(wait)

    def _wants_more(self) -> bool:
        """Whether to try claiming now (the claim itself says which batches qualify)."""
        if not self.held:
            return True
        if self._one_at_a_time or self._switching_to is not None:
            return False
        if self.ctx.engines.due_retries():
            return False  # drain first: loading that model swaps the engine out
        if self._window is None or not self._engine_ready():
            return False  # the first chunk is still loading its engine
        # Past the cap, only to keep the engine fed: lines, not chunks, bound that claim.
        return len(self.held) < self.ctx.settings.max_chunks_in_flight or self._feed_low()

    def _engine_ready(self) -> bool:
        """The engine of the held chunks is loaded and is the one the window belongs to."""
        model = next(iter(self.held.values())).run.chunk.model
        engines = self.ctx.engines
        return engines.loaded_model == model and (
            self._window_engine is not None and self._window_engine.model_name == model
        )

    def _feed_low(self) -> bool:
        """The lines left in the held chunks no longer fill the engine's window."""
        window = self._window
        if window is None:
            return False
        return sum(held.run.remaining for held in self.held.values()) < window.size

    async def claim(self) -> ChunkRow | None:
        """The next chunk for this worker, or None.

        Holding chunks: another chunk of their model, of any batch while the feed runs low,
        else only of a batch not held yet (fairness). Idle: the loaded model first (no
        swap) unless another model is starved, then any model this worker may load.
        """
        claimable = self.ctx.engines.claimable_models()
        spl = self.pace.seconds_per_line()
        if self.held:
            model = next(iter(self.held.values())).run.chunk.model
            await self._check_starvation(model, claimable)
            if self._switching_to is not None or model not in claimable:
                return None
            exclude = set() if self._feed_low() else self._held_batches()
            return await lifecycle.claim_chunk(
                self.ctx,
                self.ctx.worker_id,
                [model],
                seconds_per_line=spl,
                exclude_batches=exclude,
                exclude_chunks=set(self.held),
            )
        loaded = self.ctx.engines.loaded_model
        preferences: list[list[str]] = []
        if self._switching_to in claimable:
            preferences.append([self._switching_to])
        self._switching_to = None
        if loaded in claimable:
            preferences.append([loaded])
        preferences.append(claimable)
        for models in preferences:
            chunk = await lifecycle.claim_chunk(
                self.ctx, self.ctx.worker_id, models, seconds_per_line=spl
            )
            if chunk is not None:
                return chunk
        return None

    async def _check_starvation(self, model: str, claimable: list[str]) -> None:
        """Start draining ``model`` if another model's work waited too long (polled)."""
        others = [name for name in claimable if name != model]
        now = time.monotonic()
        if not others or self._switching_to is not None or now < self._next_starvation_check:
            return
        self._next_starvation_check = now + max(self.ctx.settings.poll_interval, 1.0)
        starved = await lifecycle.starved_models(self.ctx, others)
        if starved:
            log.info(
                "work for %s waited over %.0f s: finishing %s, then switching",
                starved[0],
                self.ctx.settings.model_max_wait,
                model,
            )
            self._switching_to = starved[0]

    def _held_batches(self) -> set[str]:
        return {held.run.chunk.batch_id for held in self.held.values()}

    def _start(self, chunk: ChunkRow) -> None:
        run = ChunkRun(
            self.ctx,
            chunk,
            self._shutdown,
            windows=self._window_for,
            seconds_per_line=self.pace.seconds_per_line,
            on_result=self._on_result,
            flush_scale=self._flush_scale,
        )
        task = asyncio.create_task(self._drive(run))
        self.held[chunk.id] = _Held(run, task)

    def _flush_scale(self) -> float:
        """Held chunks save (and renew their leases) less often when there are many, so
        the database sees about as many writes as with ``FLUSHES_AT_FULL_RATE`` chunks."""
        return max(1.0, len(self.held) / FLUSHES_AT_FULL_RATE)

    def _on_result(self) -> None:
        self.pace.add()
        if not self._queue_dry and self._feed_low():
            self._wake.set()

    def _window_for(self, engine: Engine) -> FairWindow:
        """The shared window for ``engine`` (a new engine gets a new window)."""
        size = self.ctx.engines.in_flight_window(engine)
        if self._window is None or self._window_engine is not engine:
            self._window = FairWindow(size)
            self._window_engine = engine
        elif self._window.size != size:
            self._window.resize(size)
        return self._window

    async def _drive(self, run: ChunkRun) -> None:
        """Run one held chunk to its end, then finalize its batch if it ran."""
        chunk = run.chunk
        try:
            with bound(worker=self.ctx.worker_id, batch_id=chunk.batch_id, chunk_id=chunk.id):
                ran = await self._process(run)
            if ran:
                await self._db(lambda: finalize_batch(self.ctx, chunk.batch_id), "finalize a batch")
        except Exception:
            self.errors += 1
            log.exception("chunk %s: unexpected error after it ran", chunk.id)
        finally:
            held = self.held.get(chunk.id)
            if held is not None and held.run is run:  # not a newer claim of the same chunk
                del self.held[chunk.id]
            self._wake.set()

    async def _drain(self) -> None:
        while self.held:
            await asyncio.gather(
                *(held.task for held in list(self.held.values())), return_exceptions=True
            )

    async def _try_load(self, model: str) -> None:
        """Load ``model`` now; a failure is recorded by the manager (and retried later)."""
        with contextlib.suppress(EngineLoadError):
            await self.ctx.engines.get(model)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._shutdown.wait(), seconds)

    async def _wait(self, seconds: float) -> None:
        """Until new work is announced, a held chunk ends or runs low, shutdown, or timeout."""
        waits = [
            asyncio.create_task(self.ctx.notifier.wait(seconds)),
            asyncio.create_task(self._wake.wait()),
            asyncio.create_task(self._shutdown.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()

    async def _db(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_db(
            call, what, shutdown=self._shutdown, health=self.db, backoff=self.db_backoff
        )

    async def _process(self, run: ChunkRun) -> bool:
        """Whether the chunk ran (done or handed back) rather than failed."""
        chunk = run.chunk
        log.info(
            "worker %s took chunk %s (lines %d-%d, attempt %d)",
            self.ctx.worker_id,
            chunk.id,
            chunk.start_line,
            chunk.end_line,
            chunk.attempts,
        )
        try:
            outcome = await run.run()
        except EngineLoadError as exc:
            log.error("chunk %s waits: %s; releasing it", chunk.id, exc)
            await self._release(chunk, "engine_unavailable")
            return False
        except EngineOutOfMemory as exc:
            self._engine_trouble(chunk, exc)
            await self._until_alone(run)
            await self._back_off_oom(chunk, exc)
            return False
        except EngineFailure as exc:
            log.error(
                "engine failed on chunk %s: %s; releasing it and restarting it", chunk.id, exc
            )
            self._engine_trouble(chunk, exc)
            await self._release(chunk, "engine_failure")
            return False
        except Exception:
            log.exception("chunk %s failed unexpectedly; releasing it", chunk.id)
            await self._release(chunk, "error")
            await self._pause(ERROR_PAUSE_SECONDS)
            return False
        if outcome is ChunkOutcome.DONE:
            if await self._db(lambda: self._finish(chunk), f"finish chunk {chunk.id}"):
                self.chunks_done += 1
                self._one_at_a_time = False
                metrics.chunk_done(chunk.model)
            else:
                metrics.chunk_requeued(chunk.model, "incomplete")
        elif outcome is ChunkOutcome.RELEASED:
            await self._release(chunk, "stopped")
        return True

    def _engine_trouble(self, chunk: ChunkRow, error: BaseException) -> None:
        """Stop every other held chunk: the engine is restarted or shrunk once they end."""
        if self._trouble is None:
            self._trouble = _EngineTrouble(chunk.model, error)
        for chunk_id, held in list(self.held.items()):
            if chunk_id != chunk.id:
                held.run.halt()

    async def _until_alone(self, run: ChunkRun) -> None:
        """Wait until ``run`` is the only chunk held."""
        while any(held.run is not run for held in self.held.values()):
            others = [held.task for held in self.held.values() if held.run is not run]
            await asyncio.gather(*others, return_exceptions=True)

    async def _recover(self) -> None:
        """After an engine failure, once every chunk is back: restart the engine once."""
        await self._drain()
        trouble, self._trouble = self._trouble, None
        if trouble is None or isinstance(trouble.error, EngineOutOfMemory):
            return  # the out-of-memory back-off already ran in the chunk's task
        log.error("restarting the engine after: %s", trouble.error)
        self._one_at_a_time = True
        await self.ctx.engines.restart()
        await self._pause(ENGINE_RETRY_SECONDS)

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
            self._one_at_a_time = True
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
        try:
            status = await lifecycle.finish_chunk(self.ctx, chunk, self.ctx.worker_id)
        except IllegalTransition:
            log.error("chunk %s is no longer ours", chunk.id)
            return False
        if status is not ChunkStatus.DONE:
            log.error("chunk %s is missing results; released it", chunk.id)
        return status is ChunkStatus.DONE

    async def _release(self, chunk: ChunkRow, reason: str) -> None:
        """Hand ``chunk`` back to the queue; ``reason`` is a ``chunk_requeues`` label."""
        try:
            await self._db(
                lambda: lifecycle.release_chunk(
                    self.ctx,
                    chunk,
                    self.ctx.worker_id,
                    engine_failure=reason == "engine_failure",
                ),
                f"release chunk {chunk.id}",
            )
        except IllegalTransition:
            return  # no longer ours: its new holder runs it
        metrics.chunk_requeued(chunk.model, reason)
