"""The GPU health guard: stop claiming new work while a GPU is too hot or thermal-throttled.

A GPU at or above ``gpu_max_temperature``, or throttled for a reason in
``gpu_pause_throttle_reasons`` (thermal slowdowns by default; power capping is normal under
load and does not pause), pauses claims. Claims resume only once every GPU is at or below
``gpu_resume_temperature`` and no longer thermal-throttled (hysteresis). Chunks already
running finish. Each pause and resume is one log line with its reason, and the
``vllm_batch_gpu_claims_paused`` gauge follows. Without readings (no GPU, NVML failing) the
guard never pauses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from vllm_batch.config import Settings
from vllm_batch.observability.gpu import (
    GPU_CLAIMS_PAUSED,
    GPU_PAUSES,
    OOM_BACKOFFS,
    THROTTLE_REASON_NAMES,
    GpuReadings,
    ReadingsSource,
    export_readings,
)

log = logging.getLogger(__name__)


class GpuGuard:
    """Reads the GPUs every ``gpu_poll_interval`` and decides whether claims are paused."""

    def __init__(
        self,
        source: ReadingsSource,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = set(settings.gpu_pause_throttle_reasons) - THROTTLE_REASON_NAMES
        if unknown:
            raise ValueError(
                f"unknown GPU throttle reasons in gpu_pause_throttle_reasons: "
                f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(THROTTLE_REASON_NAMES))})"
            )
        self.source = source
        self.enabled = settings.gpu_guard
        self.max_temperature = settings.gpu_max_temperature
        self.resume_temperature = settings.gpu_resume_temperature
        self.pause_reasons = frozenset(settings.gpu_pause_throttle_reasons)
        self.poll_interval = settings.gpu_poll_interval
        self._clock = clock
        self.readings: GpuReadings | None = None
        self.paused = False
        self.pause_reason: str | None = None
        self.paused_since: float | None = None
        self.pauses = 0
        self.oom_backoffs = 0
        GPU_CLAIMS_PAUSED.set(0)

    async def refresh(self) -> GpuReadings:
        """Read the GPUs now (in a thread) and apply the policy."""
        try:
            readings = await anyio.to_thread.run_sync(self.source.read)
        except Exception as exc:  # a source must not raise; if one does, it is "no readings"
            readings = GpuReadings.unavailable(f"GPU readings failed: {exc.__class__.__name__}")
        self.update(readings)
        return readings

    async def run(self, shutdown: asyncio.Event) -> None:
        """Refresh every ``poll_interval`` until ``shutdown``."""
        while not shutdown.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(shutdown.wait(), self.poll_interval)
            if not shutdown.is_set():
                try:
                    await self.refresh()
                except Exception:  # never let a bad reading stop the polling
                    log.exception("GPU guard: reading the GPUs failed")

    def update(self, readings: GpuReadings) -> None:
        """Apply the policy to new readings: pause, stay, or resume (logging each change)."""
        self.readings = readings
        export_readings(readings)
        trouble = self._trouble(readings) if self.enabled else None
        if trouble is not None and not self.paused:
            kind, reason = trouble
            self.paused, self.pause_reason, self.paused_since = True, reason, self._clock()
            self.pauses += 1
            GPU_PAUSES.labels(reason=kind).inc()
            GPU_CLAIMS_PAUSED.set(1)
            log.warning("GPU guard: pausing claims for new work: %s", reason)
        elif self.paused:
            still = self._still_hot(readings)
            if still is None:
                self._resume(readings)
            else:
                self.pause_reason = still

    def _trouble(self, readings: GpuReadings) -> tuple[str, str] | None:
        """``(kind, reason)`` if some GPU must pause claims, else None."""
        for gpu in readings.gpus:
            throttled = [r for r in gpu.throttle_reasons if r in self.pause_reasons]
            if throttled:
                return "thermal_throttle", f"GPU {gpu.index} throttled ({', '.join(throttled)})"
            temp = gpu.temperature_celsius
            if temp is not None and temp >= self.max_temperature:
                return (
                    "temperature",
                    f"GPU {gpu.index} at {temp:.0f} °C (pause at {self.max_temperature:.0f} °C)",
                )
        return None

    def _still_hot(self, readings: GpuReadings) -> str | None:
        """Why claims stay paused (hysteresis), or None once every GPU has cooled."""
        trouble = self._trouble(readings)
        if trouble is not None:
            return trouble[1]
        for gpu in readings.gpus:
            temp = gpu.temperature_celsius
            if temp is not None and temp > self.resume_temperature:
                return (
                    f"GPU {gpu.index} at {temp:.0f} °C "
                    f"(resume at {self.resume_temperature:.0f} °C or below)"
                )
        return None

    def _resume(self, readings: GpuReadings) -> None:
        if readings.available:
            temps = [
                f"GPU {g.index} {g.temperature_celsius:.0f} °C"
                for g in readings.gpus
                if g.temperature_celsius is not None
            ]
            why = f"cooled down ({', '.join(temps) or 'no temperatures'})"
        else:
            why = f"no GPU readings ({readings.reason})"
        paused_for = self._clock() - (self.paused_since or self._clock())
        log.warning(
            "GPU guard: resuming claims after %.0f s: %s (was: %s)",
            paused_for,
            why,
            self.pause_reason,
        )
        self.paused, self.pause_reason, self.paused_since = False, None, None
        GPU_CLAIMS_PAUSED.set(0)

    def record_oom(self, model: str) -> None:
        """Count a CUDA out-of-memory back-off (for metrics and ``state``)."""
        self.oom_backoffs += 1
        OOM_BACKOFFS.labels(model=model).inc()

    def state(self) -> dict[str, Any]:
        """Readings and guard state as plain JSON, for ``/ready`` and the dashboard."""
        readings = self.readings
        return {
            "guard": "on" if self.enabled else "off",
            "available": readings.available if readings else False,
            "reason": (readings.reason if readings else "not read yet"),
            "claims_paused": self.paused,
            "pause_reason": self.pause_reason,
            "paused_since": self.paused_since,
            "pauses": self.pauses,
            "oom_backoffs": self.oom_backoffs,
            "thresholds": {
                "max_temperature_celsius": self.max_temperature,
                "resume_temperature_celsius": self.resume_temperature,
                "pause_throttle_reasons": sorted(self.pause_reasons),
                "poll_interval_seconds": self.poll_interval,
            },
            "read_at": readings.read_at if readings else None,
            "gpus": [gpu.as_dict() for gpu in readings.gpus] if readings else [],
        }
