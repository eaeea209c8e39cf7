"""Readiness checks: can the database be written, does the worker run, can its engine load,
has the file storage room.

Each check returns a ``Check``; ``/ready`` is 200 only if all pass. A check names a reason
when it fails and never raises (this is a probe). Ids (worker, chunk, batch) and error
texts go into ``details``, which only a caller with a valid API key gets to see.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from vllm_batch.api.state import AppContext
from vllm_batch.batches.store.db import probe_database
from vllm_batch.storage.blob import read_status

DB_TIMEOUT_SECONDS = 2.0


@dataclass
class Check:
    """One component's verdict: ``ok``, a public ``state``, a ``reason`` and ``details``."""

    ok: bool
    state: dict[str, Any]
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


async def check_database(ctx: AppContext, timeout: float = DB_TIMEOUT_SECONDS) -> Check:
    """The database answers within ``timeout`` (on SQLite: its write lock can be taken)."""
    url = ctx.settings.resolved_database_url
    started = time.monotonic()
    try:
        await probe_database(url, ctx.sessions, timeout)
    except Exception as exc:  # report, don't raise: this is a probe
        kind = "timeout" if isinstance(exc, TimeoutError) else exc.__class__.__name__
        return Check(
            ok=False,
            state={"state": "unavailable"},
            reason=f"database did not answer ({kind})",
            details={"error": f"{exc.__class__.__name__}: {exc}"[:300]},
        )
    return Check(ok=True, state={"state": "ok", "ms": round(1000 * (time.monotonic() - started))})


def check_worker(ctx: AppContext) -> Check:
    """The worker runs, sees the database, and its engine is not failing to load."""
    status = ctx.worker_status()
    if status is None:
        return Check(ok=True, state={"enabled": False})
    return Check(ok=status.ok, state=status.state, reason=status.reason, details=status.details)


def check_services(ctx: AppContext) -> Check:
    """Background services (housekeeping, validation sweeper) are running."""
    state = {h.name: {"running": h.running, "restarts": h.restarts} for h in ctx.services}
    down = [h.name for h in ctx.services if not h.running]
    return Check(
        ok=not down,
        state=state,
        reason=f"not running (restarting): {', '.join(down)}" if down else None,
        details={h.name: h.last_error for h in ctx.services if h.last_error},
    )


def check_gpu(ctx: AppContext) -> Check:
    """GPU readings and the guard's state. Never fails readiness: a hot GPU only pauses
    claims (the API still serves), and a host without a GPU is a normal setup."""
    status = ctx.worker_status()
    if status is None:
        return Check(ok=True, state={"guard": "off", "available": False, "reason": "no worker"})
    state = {**status.gpu, "gpus": [dict(gpu) for gpu in status.gpu.get("gpus", [])]}
    uuids = {str(gpu["index"]): gpu.pop("uuid", None) for gpu in state["gpus"]}
    return Check(ok=True, state=state, details={"uuids": uuids})


async def check_storage(ctx: AppContext) -> Check:
    """The file storage has room: free space above the minimum, no write refused lately."""
    try:
        status = await anyio.to_thread.run_sync(
            read_status, ctx.storage, ctx.settings.storage_min_free_bytes
        )
    except Exception as exc:  # report, don't raise: this is a probe
        return Check(
            ok=False,
            state={"state": "unavailable"},
            reason=f"file storage could not be checked ({exc.__class__.__name__})",
            details={"error": f"{exc.__class__.__name__}: {exc}"[:300]},
        )
    state: dict[str, Any] = {
        "state": "ok" if status.ok else "full",
        "free_bytes": status.free_bytes,
        "total_bytes": status.total_bytes,
        "min_free_bytes": status.min_free_bytes if status.free_bytes is not None else None,
        "last_refused_seconds_ago": (
            None if status.failure_age is None else round(status.failure_age)
        ),
    }
    details = {"location": status.where, "last_error": status.last_error}
    return Check(ok=status.ok, state=state, reason=status.reason, details=details)
