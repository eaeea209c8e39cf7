"""Remove finalization attempts left behind in storage: ``batches/<batch_id>/<attempt>/``.

A failed attempt removes its own blobs, but a process killed mid-attempt (or an older
version, which left empty attempt directories) does not. An attempt is stale when no file
row points at its blobs and nobody can still be writing it: its batch is gone or finished,
or no live finalization lease is held on it (a writer whose lease lapsed can no longer
commit) and this process is not finalizing it. The order of the reads matters: the keys
are listed first, then the batches, then the file rows, so an attempt that commits in
between is seen either as still leased or as referenced.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import anyio

from vllm_batch.batches.states import TERMINAL
from vllm_batch.batches.store import queries
from vllm_batch.batches.store_context import StoreContext

log = logging.getLogger(__name__)
PREFIX = "batches"


def group_attempts(keys: list[str]) -> dict[tuple[str, str], list[str]]:
    """``batches/<batch>/<attempt>/<name>`` keys by (batch, attempt); other keys are left out."""
    attempts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in keys:
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == PREFIX and all(parts[1:]):
            attempts[(parts[1], parts[2])].append(key)
    return attempts


async def sweep_stale_attempts(ctx: StoreContext, now: float | None = None) -> int:
    """Delete the blobs of stale attempts (and, on local storage, empty directories);
    returns how many attempts went."""
    storage = ctx.storage
    keys = await anyio.to_thread.run_sync(lambda: list(storage.iter_keys(PREFIX)))
    attempts = group_attempts(keys)
    stale: list[tuple[str, str]] = []
    if attempts:
        at = time.time() if now is None else now
        async with ctx.read_sessions() as session:
            leases = await queries.finalize_leases(session, {b for b, _ in attempts})
            referenced = await queries.referenced_keys(session, keys)
        for (batch_id, attempt), blobs in attempts.items():
            if batch_id in ctx.finalizing or any(key in referenced for key in blobs):
                continue
            status, until = leases.get(batch_id, (None, None))
            if status is None or status in TERMINAL or until is None or until < at:
                stale.append((batch_id, attempt))
    for batch_id, attempt in stale:
        for key in attempts[(batch_id, attempt)]:
            await anyio.to_thread.run_sync(storage.delete, key)
        log.info("batch %s: removed stale finalization attempt %s", batch_id, attempt)
    prune = getattr(storage, "prune_empty", None)
    if callable(prune):
        await anyio.to_thread.run_sync(prune, PREFIX)
    return len(stale)
