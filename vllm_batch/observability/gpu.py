"""GPU readings through NVML (``nvidia-ml-py``), and the Prometheus gauges they set.

``NvmlReader`` reads every GPU this process may use (``CUDA_VISIBLE_DEVICES`` if it lists
indices or UUIDs, else all): utilisation, memory, temperature, power and throttle reasons.
Without an NVIDIA driver it answers ``GpuReadings(available=False, reason=...)`` and never
raises. ``pynvml`` is imported on first read only. Anything with a ``read()`` returning
``GpuReadings`` (``ReadingsSource``) can stand in for it, e.g. in tests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)
NVML_RETRY_SECONDS = 60.0

# NVML's clocks-event (throttle) reason bits, stable across driver versions.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
THROTTLE_REASON_NAMES = frozenset(THROTTLE_REASONS.values())


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    """The names of the reasons set in an NVML throttle-reason bitmask, lowest bit first."""
    return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; a field is None when the GPU does not report it."""

    index: int
    name: str
    uuid: str | None = None
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    throttle_reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["throttle_reasons"] = list(self.throttle_reasons)
        return out


@dataclass(frozen=True)
class GpuReadings:
    """All GPUs at one moment, or why there are none (``available=False``)."""

    available: bool
    gpus: tuple[GpuReading, ...] = ()
    reason: str | None = None
    read_at: float = field(default_factory=time.time)

    @classmethod
    def unavailable(cls, reason: str) -> GpuReadings:
        return cls(available=False, reason=reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "read_at": round(self.read_at, 3),
            "gpus": [gpu.as_dict() for gpu in self.gpus],
        }


class ReadingsSource(Protocol):
    """Where GPU readings come from (blocking; called in a thread). Must not raise."""

    def read(self) -> GpuReadings: ...


def visible_devices(env: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs); None means every GPU."""
    if env is None or not env.strip():
        return None
    return [part.strip() for part in env.split(",") if part.strip()]


class NvmlReader:
    """Reads GPUs through NVML; reports "no GPU" (and retries init now and then) without one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._failure: str | None = None
        self._failed_at = 0.0

    def read(self) -> GpuReadings:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return GpuReadings.unavailable(self._failure or "NVML unavailable")
            try:
                return GpuReadings(available=True, gpus=tuple(self._read_all(nvml)))
            except Exception as exc:  # e.g. a GPU fell off the bus: report, re-init later
                self._fail(f"NVML: {exc}")
                self._shutdown()
                return GpuReadings.unavailable(self._failure or "NVML failed")

    def _init(self) -> Any:
        if self._nvml is not None:
            return self._nvml
        if self._failure is not None and self._clock() - self._failed_at < NVML_RETRY_SECONDS:
            return None
        try:
            import pynvml
        except ImportError:
            self._fail("nvidia-ml-py is not installed")
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            self._fail(f"NVML: {exc}")
            return None
        self._nvml, self._failure = pynvml, None
        return pynvml

    def _fail(self, reason: str) -> None:
        if reason != self._failure:
            log.info("no GPU readings: %s", reason)
        self._failure, self._failed_at = reason, self._clock()

    def _shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)

    def _read_all(self, nvml: Any) -> list[GpuReading]:
        wanted = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        readings = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _optional(nvml.nvmlDeviceGetUUID, handle)
            uuid = _text(uuid) if uuid is not None else None
            if wanted is not None and str(index) not in wanted and uuid not in wanted:
                continue
            readings.append(_read_one(nvml, index, handle, uuid))
        return readings

    def close(self) -> None:
        with self._lock:
            self._shutdown()


def _read_one(nvml: Any, index: int, handle: Any, uuid: str | None) -> GpuReading:
    memory = _optional(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    utilization = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    power_mw = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    limit_mw = _optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    get_reasons = (  # the newer name first; older bindings only have the throttle one
        getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    )
    mask = _optional(lambda: get_reasons(handle))
    return GpuReading(
        index=index,
        name=_optional(lambda: _text(nvml.nvmlDeviceGetName(handle))) or f"GPU {index}",
        uuid=uuid,
        utilization_percent=float(utilization.gpu) if utilization is not None else None,
        memory_used_bytes=int(memory.used) if memory is not None else None,
        memory_total_bytes=int(memory.total) if memory is not None else None,
        temperature_celsius=_optional(
            lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        ),
        power_watts=power_mw / 1000 if power_mw is not None else None,
        power_limit_watts=limit_mw / 1000 if limit_mw is not None else None,
        throttle_reasons=decode_throttle_reasons(int(mask)) if mask is not None else (),
    )


def _optional(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, or None if the GPU does not support that query."""
    try:
        return call(*args)
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ------------------------------------------------------------------ metrics
# Several processes may read the same GPU: readings merge by max among live processes.


def _gpu_gauge(name: str, doc: str) -> Gauge:
    return Gauge(f"vllm_batch_gpu_{name}", doc, ["gpu"], multiprocess_mode="livemax")


GPU_UTILIZATION = _gpu_gauge(
    "utilization_percent", "GPU utilisation (percent of time a kernel ran)."
)
GPU_MEMORY_USED = _gpu_gauge("memory_used_bytes", "GPU memory in use.")
GPU_MEMORY_TOTAL = _gpu_gauge("memory_total_bytes", "GPU memory in all.")
GPU_TEMPERATURE = _gpu_gauge("temperature_celsius", "GPU core temperature.")
GPU_POWER = _gpu_gauge("power_watts", "GPU power draw.")
GPU_POWER_LIMIT = _gpu_gauge("power_limit_watts", "GPU enforced power limit.")
GPU_THROTTLED = Gauge(
    "vllm_batch_gpu_throttled",
    "1 while the GPU's clocks are held down for this reason (NVML clocks-event reasons).",
    ["gpu", "reason"],
    multiprocess_mode="livemax",
)
GPU_AVAILABLE = Gauge(
    "vllm_batch_gpu_available",
    "1 if this process can read its GPUs through NVML, else 0 (no GPU or driver).",
    multiprocess_mode="livemax",
)
GPU_CLAIMS_PAUSED = Gauge(
    "vllm_batch_gpu_claims_paused",
    "1 while the GPU guard keeps this worker from claiming new work (too hot or throttled).",
    multiprocess_mode="livemax",
)
GPU_PAUSES = Counter(
    "vllm_batch_gpu_pauses",
    "Times the GPU guard paused claiming, by first reason (temperature, thermal_throttle).",
    ["reason"],
)
OOM_BACKOFFS = Counter(
    "vllm_batch_oom_backoffs",
    "CUDA out-of-memory errors that shrank the in-flight window and retried the chunk.",
    ["model"],
)


def export_readings(readings: GpuReadings) -> None:
    """Set the GPU gauges from ``readings`` (only the values a GPU reports)."""
    GPU_AVAILABLE.set(1 if readings.available else 0)
    for gpu in readings.gpus:
        label = str(gpu.index)
        for gauge, value in (
            (GPU_UTILIZATION, gpu.utilization_percent),
            (GPU_MEMORY_USED, gpu.memory_used_bytes),
            (GPU_MEMORY_TOTAL, gpu.memory_total_bytes),
            (GPU_TEMPERATURE, gpu.temperature_celsius),
            (GPU_POWER, gpu.power_watts),
            (GPU_POWER_LIMIT, gpu.power_limit_watts),
        ):
            if value is not None:
                gauge.labels(gpu=label).set(value)
        active = set(gpu.throttle_reasons)
        for reason in THROTTLE_REASONS.values():
            GPU_THROTTLED.labels(gpu=label, reason=reason).set(1 if reason in active else 0)
