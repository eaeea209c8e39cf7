"""Periodic upkeep run by every server and worker process; every step is idempotent.

- release leases held by dead processes on this host (a ``kill -9`` before a restart);
- mark batches past their completion window for expiry;
- assemble output files for batches that are ready (completed, cancelled, expired);
- delete files past ``expires_at`` and their stored blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

import anyio
import psutil

from vllm_batch.protocol.ids import now
from vllm_batch.store import queries
from vllm_batch.worker.context import StoreContext
from vllm_batch.worker.finalize import finalize_ready_batches

log = logging.getLogger(__name__)
INTERVAL_SECONDS = 2.0


def owner_is_dead(owner: str, instance_id: str, prefix: str) -> bool:
    """Whether a lease owner ``host-pid-random`` on this host no longer runs.

    An owner with our own pid but another id is an earlier incarnation (containers
    reuse pids after a restart), so it is dead too.
    """
    if owner == instance_id:
        return False
    pid_text = owner[len(prefix) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid == os.getpid() or not psutil.pid_exists(pid)


async def release_dead_owners(ctx: StoreContext) -> int:
    prefix = f"{socket.gethostname()}-"
    async with ctx.sessions() as session, session.begin():
        dead = [
            o
            for o in await queries.lease_owners(session, prefix)
            if owner_is_dead(o, ctx.instance_id, prefix)
        ]
        for owner in dead:
            log.warning("releasing leases of dead worker %s", owner)
            await queries.release_owner(session, owner)
    if dead:
        ctx.notifier.wake()
    return len(dead)


async def expire_overdue(ctx: StoreContext) -> None:
    async with ctx.sessions() as session, session.begin():
        for batch_id in await queries.overdue_batches(session, now()):
            log.info("batch %s passed its completion window: expiring", batch_id)
            await queries.request_stop(session, batch_id, "expire", now())


async def sweep_expired_files(ctx: StoreContext) -> int:
    async with ctx.sessions() as session, session.begin():
        files = await queries.expired_files(session, now())
        for row in files:
            await queries.delete_file(session, row.id)
    for row in files:
        await anyio.to_thread.run_sync(ctx.storage.delete, row.storage_key)
        log.info("deleted expired file %s", row.id)
    return len(files)


async def housekeeping_once(ctx: StoreContext) -> None:
    await release_dead_owners(ctx)
    await expire_overdue(ctx)
    await finalize_ready_batches(ctx)
    await sweep_expired_files(ctx)


async def run_housekeeping(ctx: StoreContext, shutdown: asyncio.Event) -> None:
    """Run ``housekeeping_once`` every few seconds until ``shutdown``; never dies."""
    while not shutdown.is_set():
        try:
            await housekeeping_once(ctx)
        except Exception:
            log.exception("housekeeping failed; retrying")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdown.wait(), INTERVAL_SECONDS)
