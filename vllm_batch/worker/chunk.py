"""Run one leased chunk: stream its lines into the engine, save results as they finish.

Requests are submitted through a bounded in-flight window (the engine's batch size,
twice over) so the engine never starves and never holds the whole file. Finished
results are saved with the lease renewal every ``flush_every`` results or
``flush_interval`` seconds; lines already saved are skipped on resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from enum import Enum
from itertools import islice
from typing import Any

import anyio
import orjson

from vllm_batch.engines.base import Engine, EngineFailure
from vllm_batch.store import queries
from vllm_batch.store.models import ChunkRow
from vllm_batch.validation import iter_lines
from vllm_batch.worker.context import WorkerContext
from vllm_batch.worker.output import failure_line, result_line

log = logging.getLogger(__name__)
READ_BLOCK = 256


class ChunkOutcome(Enum):
    DONE = "done"
    RELEASED = "released"  # stopped early (shutdown, batch stopping); lines left for later
    LOST = "lost"  # another worker took over the lease


@dataclass
class _Progress:
    pending: list[queries.LineResult] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)


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


async def run_chunk(ctx: WorkerContext, chunk: ChunkRow, shutdown: asyncio.Event) -> ChunkOutcome:
    """Process every not-yet-saved line of ``chunk`` while we hold its lease."""
    async with ctx.sessions() as session:
        batch = await queries.get_batch(session, chunk.batch_id)
        input_file = await queries.get_file(session, batch.input_file_id) if batch else None
        done = await queries.done_lines(session, chunk.batch_id, chunk.start_line, chunk.end_line)
    if batch is None or input_file is None:
        log.error("chunk %s has no batch or input file; releasing it", chunk.id)
        return ChunkOutcome.RELEASED
    engine = await ctx.engines.get(chunk.model)
    runner = _ChunkRunner(ctx, chunk, engine, batch.endpoint, shutdown)
    lines = iter_chunk_requests(ctx, input_file.storage_key, chunk)
    try:
        return await runner.run(lines, done)
    finally:
        await anyio.to_thread.run_sync(lines.close)


class _ChunkRunner:
    def __init__(
        self,
        ctx: WorkerContext,
        chunk: ChunkRow,
        engine: Engine,
        endpoint: str,
        shutdown: asyncio.Event,
    ) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.engine = engine
        self.endpoint = endpoint
        self.shutdown = shutdown
        self.stop = asyncio.Event()
        self.outcome = ChunkOutcome.DONE
        self.progress = _Progress()
        self.tasks: set[asyncio.Task[None]] = set()
        self.failure: EngineFailure | None = None
        self.flush_lock = asyncio.Lock()
        self.flush_wanted = asyncio.Event()

    async def run(
        self, lines: Generator[tuple[int, bytes], None, None], done: set[int]
    ) -> ChunkOutcome:
        window = asyncio.Semaphore(self.engine.max_in_flight)
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while not self.stop.is_set():
                block = await anyio.to_thread.run_sync(lambda: list(islice(lines, READ_BLOCK)))
                if not block:
                    break
                for index, raw in block:
                    if index in done:
                        continue
                    await window.acquire()
                    if self.stop.is_set():
                        window.release()
                        break
                    task = asyncio.create_task(self._one(index, raw, window))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:
            heartbeat.cancel()
            for task in list(self.tasks):
                task.cancel()  # vLLM aborts a request whose caller is cancelled
            if self.tasks:
                await asyncio.wait(set(self.tasks))
        await self._flush()
        if self.failure is not None:
            raise self.failure
        return self.outcome

    async def _one(self, index: int, raw: bytes, window: asyncio.Semaphore) -> None:
        try:
            line_result = await self._execute(index, raw)
        except EngineFailure as exc:
            self.failure = exc
            self._halt(ChunkOutcome.RELEASED)
            return
        finally:
            window.release()
        self.progress.pending.append(line_result)
        if len(self.progress.pending) >= self.ctx.settings.flush_every:
            self.flush_wanted.set()

    async def _execute(self, index: int, raw: bytes) -> queries.LineResult:
        try:
            line: dict[str, Any] = orjson.loads(raw)
            custom_id = str(line["custom_id"])
            body = line["body"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            data = failure_line(f"line-{index + 1}", "invalid_request", f"Unreadable line: {exc}")
            return queries.LineResult(line=index, is_error=True, data=data)
        request_id = f"{self.chunk.batch_id}-{index}-{self.chunk.attempts}"
        result = await self.engine.run(self.endpoint, body, request_id)
        return queries.LineResult(
            line=index,
            is_error=not result.ok,
            data=result_line(custom_id, result, request_id),
            input_tokens=result.input_tokens,
            cached_tokens=result.cached_tokens,
            output_tokens=result.output_tokens,
            reasoning_tokens=result.reasoning_tokens,
        )

    def _halt(self, outcome: ChunkOutcome) -> None:
        if not self.stop.is_set():
            self.outcome = outcome
            self.stop.set()
            for task in list(self.tasks):
                task.cancel()

    async def _heartbeat(self) -> None:
        interval = self.ctx.settings.flush_interval
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush_wanted.wait(), interval)
            self.flush_wanted.clear()
            await self._flush()
            if self.shutdown.is_set():
                self._halt(ChunkOutcome.RELEASED)

    async def _flush(self) -> None:
        """Save finished results, renew the lease and look for a stop request, atomically."""
        async with self.flush_lock:
            pending, self.progress.pending = self.progress.pending, []
            settings = self.ctx.settings
            async with self.ctx.sessions() as session, session.begin():
                await queries.save_results(session, self.chunk.batch_id, pending)
                held = await queries.renew_lease(
                    session, self.chunk.id, self.ctx.worker_id, time.time() + settings.lease_seconds
                )
                reason = await queries.batch_stop_reason(session, self.chunk.batch_id)
            self.progress.last_flush = time.monotonic()
            if not held:
                log.warning("lost the lease on chunk %s", self.chunk.id)
                self._halt(ChunkOutcome.LOST)
            elif reason is not None:
                log.info(
                    "batch %s is stopping (%s): aborting chunk %s",
                    self.chunk.batch_id,
                    reason,
                    self.chunk.id,
                )
                self._halt(ChunkOutcome.RELEASED)
