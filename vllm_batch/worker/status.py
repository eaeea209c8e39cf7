"""What ``/ready``, ``/`` and the dashboard show of a worker, as plain data.

Built where the worker runs: in the API process for an inline worker, in the worker's own
process for ``serve``'s child worker, which sends it to the API over a pipe (JSON).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_batch.worker.loop import Worker


@dataclass
class WorkerStatus:
    """A worker's readiness verdict (``ok``, public ``state``, ``reason``, ``details``)."""

    worker_id: str
    ok: bool
    state: dict[str, Any]
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    """The GPU guard's state (``GpuGuard.state()``)."""
    loaded_model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerStatus:
        return cls(**data)

    def not_running(self, reason: str) -> WorkerStatus:
        """This status with the worker known to be down (``reason`` first)."""
        reasons = [reason, *([self.reason] if self.reason else [])]
        return WorkerStatus(
            worker_id=self.worker_id,
            ok=False,
            state={**self.state, "alive": False},
            reason="; ".join(reasons),
            details=self.details,
            gpu=self.gpu,
            loaded_model=None,
        )


def worker_status(
    worker: Worker, *, alive: bool, restarts: int, last_error: str | None
) -> WorkerStatus:
    """The worker runs (``alive``), sees the database, and its engine is not failing to load."""
    engines = worker.ctx.engines
    state: dict[str, Any] = {
        "enabled": True,
        "alive": alive,
        "restarts": restarts,
        "engine": engines.state,
        "loaded_model": engines.loaded_model,
        "busy": worker.current_chunk is not None,
        "chunks_held": len(worker.held),
        "chunks_done": worker.chunks_done,
        "database": "ok" if worker.db.ok else "retrying",
    }
    details: dict[str, Any] = {
        "id": worker.ctx.worker_id,
        "current_chunk": worker.current_chunk,
        "current_chunks": worker.current_chunks,
        "last_error": last_error,
        "database_error": worker.db.last_error,
    }
    reasons = []
    if not alive:
        reasons.append("worker task is not running (restarting)")
    if not worker.db.ok:
        assert worker.db.failing_since is not None
        reasons.append(
            f"worker cannot reach the database for "
            f"{time.time() - worker.db.failing_since:.0f} s (retrying)"
        )
    upstreams = getattr(engines.current, "upstream_states", None)
    if callable(upstreams):  # the remote engine: its upstreams (URLs only with details)
        listed = upstreams()
        healthy = sum(1 for upstream in listed if upstream["healthy"])
        state["upstreams"] = {"healthy": healthy, "total": len(listed)}
        details["upstreams"] = listed
    if engines.limits:
        state["oom_limits"] = engines.describe(details=False)["oom_limits"]
    if engines.failed:
        state["engine_failures"] = engines.describe(details=False)["failed_models"]
        details["engine_failures"] = engines.describe(details=True)["failed_models"]
        names = ", ".join(sorted(engines.failures))
        reasons.append(f"engine for {names} cannot load (retrying with backoff)")
    return WorkerStatus(
        worker_id=worker.ctx.worker_id,
        ok=not reasons,
        state=state,
        reason="; ".join(reasons) or None,
        details=details,
        gpu=worker.gpu.state(),
        loaded_model=engines.loaded_model,
    )
