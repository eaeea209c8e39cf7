"""Periodic upkeep run by every server and worker process; every step is idempotent.

- release leases held by dead processes in our PID scope (a ``kill -9`` before a restart);
- mark batches past their completion window for expiry;
- assemble output files for batches that are ready (completed, cancelled, expired), and
  drop saved results that a finished batch no longer needs;
- delete files past ``expires_at`` and their stored blobs;
- expire uploads past ``expires_at`` and delete the parts of every ended upload;
- every ``ATTEMPT_SWEEP_SECONDS`` (and at start), remove finalization attempts left in
  storage by a process that died mid-attempt (``attempt_sweep.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import anyio

from vllm_batch.batches import lifecycle
from vllm_batch.batches.attempt_sweep import sweep_stale_attempts
from vllm_batch.batches.finalize import delete_saved_results, finalize_ready_batches
from vllm_batch.batches.store import queries
from vllm_batch.batches.store.db import is_transient
from vllm_batch.batches.store.identity import InstanceId
from vllm_batch.batches.store_context import StoreContext
from vllm_batch.batches.uploads import sweep_uploads
from vllm_batch.protocol.ids import now
from vllm_batch.retry import describe

log = logging.getLogger(__name__)
INTERVAL_SECONDS = 2.0
ATTEMPT_SWEEP_SECONDS = 600.0  # lists every batch's blobs: far less often than the rest


async def release_dead_owners(ctx: StoreContext) -> int:
    """Release the leases of processes in our own PID scope that no longer run."""
    me = ctx.instance
    async with ctx.read_sessions() as session:
        owners = await queries.lease_owners(session, me.scope)
    dead = []
    for text in owners:
        owner = InstanceId.parse(text)
        if owner is not None and me.sees_dead(owner):
            dead.append(text)
    for owner_text in dead:
        log.warning("releasing leases of dead worker %s", owner_text)
        await lifecycle.release_owner(ctx, owner_text)
    if dead:
        ctx.notifier.wake()
    return len(dead)


async def expire_overdue(ctx: StoreContext) -> None:
    for batch_id in await lifecycle.expire_overdue(ctx):
        log.info("batch %s passed its completion window: expiring", batch_id)


async def sweep_finished_results(ctx: StoreContext) -> None:
    """Saved results of finished batches (left by a crash right after finalization)."""
    async with ctx.read_sessions() as session:
        leftovers = await queries.finished_batches_with_results(session)
    for batch_id in leftovers:
        await delete_saved_results(ctx, batch_id)


async def sweep_expired_files(ctx: StoreContext) -> int:
    async with ctx.sessions() as session, session.begin():
        files = await queries.expired_files(session, now())
        for row in files:
            await queries.delete_file(session, row.id)
    for row in files:
        await anyio.to_thread.run_sync(ctx.storage.delete, row.storage_key)
        log.info("deleted expired file %s", row.id)
    return len(files)


async def housekeeping_once(ctx: StoreContext, *, sweep_attempts: bool = False) -> None:
    await release_dead_owners(ctx)
    await expire_overdue(ctx)
    await finalize_ready_batches(ctx)
    await sweep_finished_results(ctx)
    await sweep_expired_files(ctx)
    await sweep_uploads(ctx)
    if sweep_attempts:
        await sweep_stale_attempts(ctx)


async def run_housekeeping(ctx: StoreContext, shutdown: asyncio.Event) -> None:
    """Run ``housekeeping_once`` every few seconds until ``shutdown``; never dies."""
    next_sweep = 0.0
    while not shutdown.is_set():
        try:
            sweep = time.monotonic() >= next_sweep
            await housekeeping_once(ctx, sweep_attempts=sweep)
            if sweep:
                next_sweep = time.monotonic() + ATTEMPT_SWEEP_SECONDS
        except Exception as exc:
            if is_transient(exc):  # an outage: one line every round, not a traceback
                log.warning("housekeeping: database unavailable (%s)", describe(exc)[:200])
            else:
                log.exception("housekeeping failed; retrying")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdown.wait(), INTERVAL_SECONDS)
