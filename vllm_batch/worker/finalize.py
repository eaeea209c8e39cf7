"""Output assembly: saved results → output and error files, then the final status.

Runs under a finalization lease, so exactly one process assembles a batch; if it dies
the lease expires and another redoes it (blob keys are per batch, so a redo overwrites).
Results stream from the database in input order; memory stays flat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

import anyio
import orjson

from vllm_batch.pipeline.output import failure_line
from vllm_batch.protocol.ids import new_id, now
from vllm_batch.storage.aio import AsyncBlobWriter
from vllm_batch.storage.base import BlobStorage
from vllm_batch.store import queries
from vllm_batch.store.models import BatchRow, FileRow
from vllm_batch.validation import iter_lines
from vllm_batch.worker.context import StoreContext

log = logging.getLogger(__name__)
FINAL_STATUS = {None: "completed", "cancel": "cancelled", "expire": "expired"}
FINALIZE_LEASE_SECONDS = 300.0
WRITE_BUFFER = 1024 * 1024


async def finalize_ready_batches(ctx: StoreContext) -> int:
    """Assemble every batch that is ready; returns how many were finished."""
    async with ctx.sessions() as session:
        candidates = await queries.finalization_candidates(session, time.time())
    finished = 0
    for batch_id in candidates:
        finished += await finalize_batch(ctx, batch_id)
    return finished


async def finalize_batch(ctx: StoreContext, batch_id: str) -> bool:
    """Write the batch's files and move it to its final status, if it is ready and free."""
    async with ctx.sessions() as session, session.begin():
        batch = await queries.claim_finalization(
            session, batch_id, owner=ctx.instance_id, now=time.time(), lease=FINALIZE_LEASE_SECONDS
        )
    if batch is None:
        return False
    status = FINAL_STATUS[batch.stop_reason]
    output_id, error_id = new_id("file-"), new_id("file-")
    output_key, error_key = f"batches/{batch_id}/output.jsonl", f"batches/{batch_id}/errors.jsonl"
    async with (
        AsyncBlobWriter(ctx.storage, output_key) as output,
        AsyncBlobWriter(ctx.storage, error_key) as errors,
    ):
        expired_lines = await _write_results(ctx, batch, output, errors)
    stamp = now()
    async with ctx.sessions() as session, session.begin():
        row = await queries.get_batch(session, batch_id)
        assert row is not None
        for file_id, key, writer, name in (
            (output_id, output_key, output, "output"),
            (error_id, error_key, errors, "errors"),
        ):
            if writer.bytes:
                session.add(
                    FileRow(
                        id=file_id,
                        bytes=writer.bytes,
                        created_at=stamp,
                        filename=f"{batch_id}_{name}.jsonl",
                        purpose="batch_output",
                        storage_key=key,
                        line_count=None,
                        expires_at=(
                            stamp + row.output_expires_after if row.output_expires_after else None
                        ),
                    )
                )
        row.output_file_id = output_id if output.bytes else None
        row.error_file_id = error_id if errors.bytes else None
        row.failed += expired_lines
        row.status = status
        row.finalize_lease_until = None
        row.finalize_owner = None
        setattr(row, f"{status}_at", stamp)
        if status == "completed" and row.finalizing_at is None:
            row.finalizing_at = stamp
        await queries.delete_results(session, batch_id)
    for writer, key in ((output, output_key), (errors, error_key)):
        if not writer.bytes:
            await anyio.to_thread.run_sync(ctx.storage.delete, key)
    log.info("batch %s %s (%d expired lines)", batch_id, status, expired_lines)
    return True


async def _write_results(
    ctx: StoreContext, batch: BatchRow, output: AsyncBlobWriter, errors: AsyncBlobWriter
) -> int:
    """Copy results in input order; for an expired batch, unfinished lines become errors."""
    buffers: dict[bool, list[bytes]] = {False: [], True: []}
    sizes = {False: 0, True: 0}
    writers = {False: output, True: errors}

    async def emit(is_error: bool, data: bytes) -> None:
        buffers[is_error].append(data)
        sizes[is_error] += len(data)
        if sizes[is_error] >= WRITE_BUFFER:
            await writers[is_error].write(b"".join(buffers[is_error]))
            buffers[is_error].clear()
            sizes[is_error] = 0

    expired_lines = 0
    missing = None
    async with ctx.sessions() as session:
        if batch.stop_reason == "expire":
            input_file = await queries.get_file(session, batch.input_file_id)
            if input_file is not None:
                missing = _MissingLines(ctx.storage, input_file.storage_key)
        async for line, is_error, data in queries.stream_results(session, batch.id):
            if missing is not None:
                for gap in await missing.until(line):
                    await emit(True, gap)
                    expired_lines += 1
            await emit(is_error, data.encode() + b"\n")
    if missing is not None:
        for gap in await missing.until(batch.total):
            await emit(True, gap)
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
