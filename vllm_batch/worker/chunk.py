"""Run one leased chunk: stream its lines through the dispatcher, save results as they finish.

Finished results are saved together with the lease renewal every ``flush_every`` results
or ``flush_interval`` seconds; lines already saved are skipped on resume, so a chunk
picked up after a crash sends only what is missing. A worker may run several chunks at
once: each has its own lease, heartbeat and saves, and a lane of the engine's shared
``FairWindow`` weighted by its batch's priority and ordered by its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Generator
from enum import Enum
from typing import Any

import anyio
import orjson

from vllm_batch.batches import lifecycle
from vllm_batch.batches.policy import batch_order
from vllm_batch.batches.states import IllegalTransition
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.db_retry import Backoff, retry_db
from vllm_batch.batches.store.rows import BatchRow, ChunkRow
from vllm_batch.engines.engine import Engine
from vllm_batch.net.media_url import MediaGuard
from vllm_batch.observability import metrics
from vllm_batch.observability.logs import bound
from vllm_batch.pipeline.dispatch import Dispatcher
from vllm_batch.pipeline.input import iter_lines
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import failure_line
from vllm_batch.pipeline.window import FairWindow, Lane
from vllm_batch.worker.context import WorkerContext

log = logging.getLogger(__name__)
SAVE_BACKOFF = Backoff(first=0.1, max=2.0)  # poll a recovering database often


class ChunkOutcome(Enum):
    DONE = "done"
    RELEASED = "released"  # stopped early (shutdown, batch stopping); lines left for later
    LOST = "lost"  # another worker took over the lease


def iter_chunk_requests(
    ctx: WorkerContext, key: str, chunk: ChunkRow
) -> Generator[tuple[int, bytes], None, None]:
    """``(request_index, raw_line)`` for the chunk's lines, read from its byte offset."""
    with ctx.storage.open_read(key, chunk.start_offset) as handle:
        index = chunk.start_line
        for _number, _offset, raw in iter_lines(handle):
            if index >= chunk.end_line:
                return
            yield index, raw
            index += 1


WindowSource = Callable[[Engine], FairWindow]
"""The worker's shared window for an engine (a chunk run alone gets a window of its own)."""


async def run_chunk(
    ctx: WorkerContext,
    chunk: ChunkRow,
    shutdown: asyncio.Event,
    *,
    windows: WindowSource | None = None,
) -> ChunkOutcome:
    """Process every not-yet-saved line of ``chunk`` while we hold its lease."""
    return await ChunkRun(ctx, chunk, shutdown, windows=windows).run()


class ChunkRun:
    """One leased chunk being run; ``halt`` stops it early (its lines stay for later)."""

    def __init__(
        self,
        ctx: WorkerContext,
        chunk: ChunkRow,
        shutdown: asyncio.Event,
        *,
        windows: WindowSource | None = None,
        seconds_per_line: Callable[[], float] = lambda: 0.0,
        on_result: Callable[[], None] = lambda: None,
        flush_scale: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.windows = windows
        self.seconds_per_line = seconds_per_line
        self.runner = _ChunkRunner(ctx, chunk, shutdown, on_result, flush_scale)

    @property
    def remaining(self) -> int:
        """Lines not finished yet (all of them until the run knows what was saved)."""
        return self.runner.remaining

    def halt(self) -> None:
        self.runner.halt(ChunkOutcome.RELEASED)

    async def run(self) -> ChunkOutcome:
        chunk = self.chunk
        with bound(worker=self.ctx.worker_id, batch_id=chunk.batch_id, chunk_id=chunk.id):
            return await self._run()

    async def _run(self) -> ChunkOutcome:
        ctx, chunk, runner = self.ctx, self.chunk, self.runner
        async with ctx.read_sessions() as session:
            batch = await queries.get_batch(session, chunk.batch_id)
            input_file = await queries.get_file(session, batch.input_file_id) if batch else None
            done = await queries.done_lines(
                session, chunk.batch_id, chunk.start_line, chunk.end_line
            )
        if batch is None or input_file is None:
            log.error("chunk %s has no batch or input file; releasing it", chunk.id)
            return ChunkOutcome.RELEASED
        runner.remaining = chunk.end_line - chunk.start_line - len(done)
        if chunk.engine_failures >= ctx.settings.max_chunk_attempts:
            await _give_up(ctx, runner, input_file.storage_key, done)
            return runner.outcome
        if runner.outcome is not ChunkOutcome.DONE:  # halted while loading
            return runner.outcome
        engine = await ctx.engines.get(chunk.model)
        window = (
            self.windows(engine)
            if self.windows is not None
            else FairWindow(ctx.engines.in_flight_window(engine))
        )
        lane = window.open_lane(**self._lane_order(batch), remaining=runner.remaining)
        runner.lane = lane
        # A batch's first chunk to reach the engine stamps its timeline (later ones find it
        # set when they load the batch and skip the write).
        first_line = (
            _FirstLineStamp(ctx, chunk.batch_id, runner.shutdown)
            if batch.first_line_started_at is None
            else None
        )
        dispatcher = Dispatcher(
            engine,
            runner.add,
            lambda i: f"{chunk.batch_id}-{i}-{chunk.attempts}",
            group_prefixes=ctx.settings.group_prefixes,
            window=window,
            lane=lane,
            read_ahead=chunk.end_line - chunk.start_line,  # the whole chunk, in prefix order
            on_first_submit=first_line.start if first_line is not None else None,
            media=MediaGuard(ctx.settings.media_allowed_hosts),
        )
        runner.dispatcher = dispatcher
        if runner.outcome is not ChunkOutcome.DONE:
            dispatcher.halt()
        lines = iter_chunk_requests(ctx, input_file.storage_key, chunk)
        heartbeat = asyncio.create_task(runner.heartbeat())
        try:
            await dispatcher.run(lines, skip=done)
        finally:
            # Stopped by a flag, not cancellation: on Python 3.11 ``wait_for`` can swallow a
            # cancel that races with the event it waits on, and the loop would never end.
            runner.finished = True
            runner.flush_wanted.set()
            await heartbeat
            await anyio.to_thread.run_sync(lines.close)
            if first_line is not None:
                await first_line.wait()
            await runner.flush()
        return runner.outcome

    def _lane_order(self, batch: BatchRow) -> dict[str, Any]:
        """The lane's weight, deadline and urgency, as ``queries.claim_chunk`` orders claims."""
        order = batch_order(
            priority=batch.priority,
            remaining=max(0, batch.total - batch.completed - batch.failed),
            created_at=batch.created_at,
            expires_at=batch.expires_at,
            now=time.time(),
            seconds_per_line=self.seconds_per_line(),
            margin=self.ctx.settings.deadline_margin,
        )
        return {"weight": order.weight, "deadline": order.latest_start, "urgent": order.urgent}


class _FirstLineStamp:
    """Records, in the background, when the chunk sent its first line to the engine: the
    batch's ``first_line_started_at`` unless an earlier time is there. Best effort: a write
    that fails (after retrying a database outage until shutdown) is logged, never fatal."""

    def __init__(self, ctx: WorkerContext, batch_id: str, shutdown: asyncio.Event) -> None:
        self.ctx = ctx
        self.batch_id = batch_id
        self.shutdown = shutdown
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Called by the dispatcher as the first line goes out (so the clock is read now)."""
        self.task = asyncio.create_task(self._write(time.time()))

    async def wait(self) -> None:
        if self.task is not None:
            await self.task

    async def _write(self, at: float) -> None:
        try:
            await retry_db(
                lambda: lifecycle.first_line_started(self.ctx, self.batch_id, at),
                f"stamp the first line of batch {self.batch_id}",
                shutdown=self.shutdown,
                backoff=SAVE_BACKOFF,
            )
        except Exception:
            log.warning("batch %s: could not record its first line's start", self.batch_id)


async def _give_up(ctx: WorkerContext, runner: _ChunkRunner, key: str, done: set[int]) -> None:
    """After too many failed attempts, the chunk's unfinished lines become error lines."""
    chunk = runner.chunk
    log.error(
        "the engine failed %d times on chunk %s; writing its remaining lines as errors",
        chunk.engine_failures,
        chunk.id,
    )
    message = (
        f"The engine failed {chunk.engine_failures} times while running this request; "
        "giving up on it."
    )

    def read() -> list[LineResult]:
        results = []
        for index, raw in iter_chunk_requests(ctx, key, chunk):
            if index not in done:
                custom_id = str(orjson.loads(raw).get("custom_id"))
                data = failure_line(custom_id, "engine_error", message)
                results.append(LineResult(line=index, is_error=True, data=data))
        return results

    runner.pending.extend(await anyio.to_thread.run_sync(read))
    await runner.flush()
    metrics.chunk_given_up(chunk.model)


class _ChunkRunner:
    """Buffers results and saves them with the lease renewal; halts on stop or lost lease."""

    def __init__(
        self,
        ctx: WorkerContext,
        chunk: ChunkRow,
        shutdown: asyncio.Event,
        on_result: Callable[[], None] = lambda: None,
        flush_scale: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.shutdown = shutdown
        self.on_result = on_result
        self.flush_scale = flush_scale
        self.dispatcher: Dispatcher | None = None
        self.lane: Lane | None = None
        self.remaining = chunk.end_line - chunk.start_line
        self.outcome = ChunkOutcome.DONE
        self.pending: list[LineResult] = []
        self.flush_lock = asyncio.Lock()
        self.flush_wanted = asyncio.Event()
        self.finished = False

    def add(self, result: LineResult) -> None:
        self.pending.append(result)
        self.remaining -= 1
        if self.lane is not None:
            self.lane.remaining = self.remaining
        self.on_result()
        if len(self.pending) >= self.ctx.settings.flush_every:
            self.flush_wanted.set()

    def halt(self, outcome: ChunkOutcome) -> None:
        if self.outcome is ChunkOutcome.DONE:
            self.outcome = outcome
        if self.dispatcher is not None:
            self.dispatcher.halt()

    async def heartbeat(self) -> None:
        """Flush every ``flush_interval * flush_scale()`` seconds (or when asked) until
        ``finished`` is set."""
        while not self.finished:
            interval = self.ctx.settings.flush_interval * self.flush_scale()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush_wanted.wait(), interval)
            self.flush_wanted.clear()
            if self.finished:
                return
            await self.flush()
            if self.shutdown.is_set():
                self.halt(ChunkOutcome.RELEASED)

    async def flush(self) -> None:
        """Save finished results, renew the lease and look for a stop request, atomically.

        Database errors are retried with backoff for as long as they last (until shutdown):
        a finished result is dropped only if the lease was lost, and then its line is
        redone by the new owner.
        """
        async with self.flush_lock:
            pending, self.pending = self.pending, []
            try:
                outcome = await retry_db(
                    lambda: lifecycle.save(self.ctx, self.chunk, self.ctx.worker_id, pending),
                    f"save results of chunk {self.chunk.id}",
                    shutdown=self.shutdown,
                    backoff=SAVE_BACKOFF,
                )
            except IllegalTransition:
                log.warning("lost the lease on chunk %s", self.chunk.id)
                if self.outcome is not ChunkOutcome.LOST:
                    metrics.chunk_lease_lost(self.chunk.model)
                self.halt(ChunkOutcome.LOST)
                return
            except BaseException:
                self.pending[:0] = pending  # keep them for the next attempt
                raise
        metrics.lines_saved(self.chunk.model, outcome.new)
        if outcome.stop_reason is not None:
            log.info(
                "batch %s is stopping (%s): aborting chunk %s",
                self.chunk.batch_id,
                outcome.stop_reason,
                self.chunk.id,
            )
            self.halt(ChunkOutcome.RELEASED)
