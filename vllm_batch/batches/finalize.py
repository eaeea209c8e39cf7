"""Output assembly: saved results → output and error files, then the final status.

One path for every batch (completed, cancelled, expired), under a finalization lease
that is renewed while writing. Each attempt writes to its own storage keys, and the
final status, file rows and ids commit in one guarded transaction that succeeds only if
this process still holds the lease; a loser deletes its own blobs. Saved results are
deleted only after that commit. Results stream in input order: memory stays flat.

When the storage refuses the output (full: ``StorageFull``), the attempt's blobs and
directories are removed, the reason goes into the batch's ``errors`` (code
``storage_full``; the status stays ``finalizing``) and our lease is pushed out to the next
try, 2 s then doubling up to ``finalize_retry_max_seconds``, so no process retries sooner.
Housekeeping takes the batch up again once that lease lapses; the commit that finishes it
clears ``errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Generator, Iterable

import anyio
import orjson

from vllm_batch.batches import lifecycle
from vllm_batch.batches.states import BatchStatus, IllegalTransition, StopReason
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.rows import BatchRow, FileRow
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.observability import metrics, timeline
from vllm_batch.observability.logs import bound
from vllm_batch.pipeline.input import iter_lines
from vllm_batch.pipeline.output import failure_line
from vllm_batch.protocol.file import FilePurpose
from vllm_batch.protocol.ids import new_id, now
from vllm_batch.storage.aio import AsyncBlobWriter
from vllm_batch.storage.blob import BlobStorage
from vllm_batch.storage.refusal import StorageFull

log = logging.getLogger(__name__)
FINALIZE_LEASE_SECONDS = 60.0
WRITE_BUFFER = 1024 * 1024
RETRY_FIRST_SECONDS = 2.0
STORAGE_FULL = "storage_full"


class FinalizationLost(Exception):
    """Another process took over this batch's finalization (our lease lapsed)."""


async def finalize_ready_batches(ctx: StoreContext) -> int:
    """Assemble every batch that is ready; returns how many were finished."""
    async with ctx.read_sessions() as session:
        candidates = await queries.finalization_candidates(session, time.time())
    finished = 0
    for batch_id in candidates:
        finished += await finalize_batch(ctx, batch_id)
    return finished


async def finalize_batch(ctx: StoreContext, batch_id: str) -> bool:
    """Write the batch's files and move it to its final status, if it is ready and free.

    A call while this process already finalizes the batch is not dropped: the running
    attempt may have found the batch not ready just before the caller's chunk finished, so
    it looks once more when it ends.
    """
    if batch_id in ctx.finalizing:
        ctx.finalize_again.add(batch_id)
        return False
    backoff = ctx.finalize_backoff.get(batch_id)
    if backoff is not None and backoff[1] > time.time():
        return False  # the storage refused the last attempt: wait for the next try
    ctx.finalizing.add(batch_id)
    try:
        with bound(worker=ctx.instance_id, batch_id=batch_id):
            while True:
                ctx.finalize_again.discard(batch_id)
                done = await _finalize(ctx, batch_id)
                if done or batch_id not in ctx.finalize_again:
                    return done
    finally:
        ctx.finalizing.discard(batch_id)
        ctx.finalize_again.discard(batch_id)


async def _finalize(ctx: StoreContext, batch_id: str) -> bool:
    # Re-entrant for this process: an attempt cut short (say, by a database outage) is
    # retried at once instead of waiting for our own lease to lapse.
    try:
        batch = await lifecycle.claim_finalization(ctx, batch_id, FINALIZE_LEASE_SECONDS)
    except IllegalTransition:
        return False  # not ready, or another process finalizes it
    attempt = secrets.token_hex(4)
    keys = {
        False: f"batches/{batch_id}/{attempt}/output.jsonl",
        True: f"batches/{batch_id}/{attempt}/errors.jsonl",
    }
    keeper = _LeaseKeeper(ctx, batch_id)
    try:
        async with keeper:
            async with (
                AsyncBlobWriter(ctx.storage, keys[False]) as output,
                AsyncBlobWriter(ctx.storage, keys[True]) as errors,
            ):
                expired_lines = await _write_results(ctx, batch, output, errors, keeper)
            keeper.check()
            stamp = now()
            files = {
                is_error: FileRow(
                    id=new_id("file-"),
                    bytes=writer.bytes,
                    created_at=stamp,
                    filename=f"{batch_id}_{'errors' if is_error else 'output'}.jsonl",
                    purpose=FilePurpose.BATCH_OUTPUT,
                    storage_key=keys[is_error],
                    line_count=None,
                    expires_at=(
                        stamp + batch.output_expires_after if batch.output_expires_after else None
                    ),
                    owner=batch.owner,
                )
                for is_error, writer in ((False, output), (True, errors))
                if writer.bytes
            }
            status = await lifecycle.finish(
                ctx,
                batch,
                files=list(files.values()),
                output_file_id=files[False].id if False in files else None,
                error_file_id=files[True].id if True in files else None,
                extra_failed=expired_lines,
            )
            finished = time.time()
    except (FinalizationLost, IllegalTransition):
        status = None
    except StorageFull as refusal:
        await _delete_blobs(ctx, keys.values())
        await _put_off(ctx, batch_id, refusal)
        return False
    except BaseException:
        await _delete_blobs(ctx, keys.values())
        raise
    if status is None:
        log.warning("batch %s: lost the finalization lease; discarding this attempt", batch_id)
        await _delete_blobs(ctx, keys.values())
        return False
    ctx.finalize_backoff.pop(batch_id, None)
    metrics.batch_finished(batch.model, status, finished - batch.created_at)
    if status is BatchStatus.COMPLETED:
        # Only the process whose final transition committed gets here: once per batch.
        metrics.batch_phases(batch.model, batch_phases(batch, finished))
    metrics.lines_expired(batch.model, expired_lines)
    await _delete_blobs(ctx, [key for is_error, key in keys.items() if is_error not in files])
    await delete_saved_results(ctx, batch_id)
    log.info("batch %s %s (%d expired lines)", batch_id, status, expired_lines)
    return True


def batch_phases(batch: BatchRow, finished: float) -> dict[str, float]:
    """A completed batch's timeline phases; ``finished`` is when its final status committed
    (the finalizer's clock: ``completed_at`` has whole seconds only)."""
    return timeline.phases(
        batch.created_at,
        batch.in_progress_at,
        batch.first_line_started_at,
        batch.last_line_finished_at,
        finished,
    )


def retry_delay(attempts: int, cap: float) -> float:
    """Seconds before the next try after ``attempts`` refused ones: 2, 4, 8, ... ``cap``."""
    return float(min(cap, RETRY_FIRST_SECONDS * 2 ** min(attempts - 1, 30)))


def storage_full_error(refusal: StorageFull, attempts: int, delay: float) -> dict[str, object]:
    """The batch's ``errors`` entry (OpenAI's shape) while its output does not fit."""
    return {
        "code": STORAGE_FULL,
        "message": (
            f"{refusal.message} The output files could not be written (attempt {attempts}); "
            f"retrying in {delay:.3g} s. The batch completes once space is freed."
        ),
        "param": None,
        "line": None,
    }


async def _put_off(ctx: StoreContext, batch_id: str, refusal: StorageFull) -> None:
    """Record why this attempt failed on the batch and hold our lease until the next try."""
    attempts = ctx.finalize_backoff.get(batch_id, (0, 0.0))[0] + 1
    delay = retry_delay(attempts, ctx.settings.finalize_retry_max_seconds)
    retry_at = time.time() + delay
    ctx.finalize_backoff[batch_id] = (attempts, retry_at)
    metrics.finalize_put_off()
    log.warning(
        "batch %s: cannot write its output files (%s); retry %d in %.3g s",
        batch_id,
        refusal,
        attempts,
        delay,
    )
    error = storage_full_error(refusal, attempts, delay)
    try:
        async with ctx.sessions() as session, session.begin():
            await queries.put_off_finalization(
                session, batch_id, owner=ctx.instance_id, errors=[error], until=retry_at
            )
    except Exception:  # e.g. SQLite on the same full disk: the lease still lapses in time
        log.exception("batch %s: could not record why finalization failed", batch_id)


async def delete_saved_results(ctx: StoreContext, batch_id: str) -> None:
    """Drop a finished batch's saved results (its output files hold them now)."""
    async with ctx.sessions() as session, session.begin():
        await queries.delete_results(session, batch_id)


async def _delete_blobs(ctx: StoreContext, keys: Iterable[str]) -> None:
    for key in list(keys):
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(ctx.storage.delete, key)


class _LeaseKeeper:
    """Renews the finalization lease in the background; ``check`` raises once it is lost."""

    def __init__(self, ctx: StoreContext, batch_id: str) -> None:
        self.ctx = ctx
        self.batch_id = batch_id
        self.lost = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _LeaseKeeper:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def check(self) -> None:
        if self.lost:
            raise FinalizationLost(self.batch_id)

    async def _run(self) -> None:
        interval = FINALIZE_LEASE_SECONDS / 4
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
            if self._stop.is_set():
                return
            try:
                await lifecycle.renew_finalization(self.ctx, self.batch_id, FINALIZE_LEASE_SECONDS)
            except IllegalTransition:
                self.lost = True
                return
            except Exception:
                log.warning("batch %s: renewing the finalization lease failed", self.batch_id)


async def _write_results(
    ctx: StoreContext,
    batch: BatchRow,
    output: AsyncBlobWriter,
    errors: AsyncBlobWriter,
    keeper: _LeaseKeeper,
) -> int:
    """Copy results in input order; for an expired batch, unfinished lines become errors."""
    buffers: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    writers = {False: output, True: errors}

    async def drain(is_error: bool) -> None:
        if sizes[is_error] >= WRITE_BUFFER:
            keeper.check()
            await writers[is_error].write(b"".join(buffers[is_error]))
            buffers[is_error].clear()
            sizes[is_error] = 0

    def add(is_error: bool, data: bytes) -> None:
        buffers[is_error].append(data)
        sizes[is_error] += len(data)

    expired_lines = 0
    missing = None
    async with ctx.read_sessions() as session:
        if batch.stop_reason == StopReason.EXPIRE:
            input_file = await queries.get_file(session, batch.input_file_id)
            if input_file is not None:
                missing = _MissingLines(ctx.storage, input_file.storage_key)
        if missing is None:
            async for texts in queries.stream_result_text(session, batch.id):
                for is_error, joined in texts.items():
                    add(is_error, f"{joined}\n".encode())
                await drain(False)
                await drain(True)
        else:
            async for page in queries.stream_results(session, batch.id):
                for line, is_error, data in page:
                    for gap in await missing.until(line):
                        add(True, gap)
                        expired_lines += 1
                    add(is_error, f"{data}\n".encode())
                await drain(False)
                await drain(True)
    if missing is not None:
        for gap in await missing.until(batch.total):
            add(True, gap)
            expired_lines += 1
        await missing.close()
    for is_error, chunks in buffers.items():
        if chunks:
            await writers[is_error].write(b"".join(chunks))
    return expired_lines


class _MissingLines:
    """Walks the input file alongside saved results, producing ``batch_expired`` lines."""

    def __init__(self, storage: BlobStorage, key: str) -> None:
        self._lines = self._read(storage, key)
        self._next = 0

    @staticmethod
    def _read(storage: BlobStorage, key: str) -> Generator[bytes, None, None]:
        with storage.open_read(key) as handle:
            for _number, _offset, raw in iter_lines(handle):
                yield raw

    async def until(self, line: int) -> list[bytes]:
        """Error lines for every request index in ``[next, line)``; ``line`` itself is done."""
        return await anyio.to_thread.run_sync(self._until, line)

    def _until(self, line: int) -> list[bytes]:
        gaps: list[bytes] = []
        while self._next < line:
            raw = next(self._lines, None)
            if raw is None:
                break
            custom_id = str(orjson.loads(raw).get("custom_id"))
            message = "This request could not be executed before the completion window expired."
            gaps.append(failure_line(custom_id, "batch_expired", message).encode() + b"\n")
            self._next += 1
        if self._next == line:
            next(self._lines, None)
            self._next += 1
        return gaps

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._lines.close)
