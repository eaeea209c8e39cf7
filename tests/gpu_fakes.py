"""TEST ONLY: scripted GPU readings and an engine that runs out of CUDA memory on cue."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.observability.gpu import GpuReading, GpuReadings


def gpu(
    temperature: float,
    *reasons: str,
    index: int = 0,
    memory_used: int = 30 << 30,
) -> GpuReading:
    """One GPU reading as NVML would give it (an 80 GB card under load)."""
    return GpuReading(
        index=index,
        name="NVIDIA A100-SXM4-80GB",
        uuid=f"GPU-test-{index}",
        utilization_percent=97.0,
        memory_used_bytes=memory_used,
        memory_total_bytes=80 << 30,
        temperature_celsius=temperature,
        power_watts=310.5,
        power_limit_watts=400.0,
        throttle_reasons=reasons,
    )


class ScriptedReadingsForTests:
    """A ``ReadingsSource`` whose readings the test sets (thread-safe; read in a thread)."""

    def __init__(self, *gpus: GpuReading) -> None:
        self._lock = threading.Lock()
        self._readings = GpuReadings(available=True, gpus=gpus)
        self.reads = 0

    def set(self, *gpus: GpuReading) -> None:
        with self._lock:
            self._readings = GpuReadings(available=True, gpus=gpus)

    def set_unavailable(self, reason: str) -> None:
        with self._lock:
            self._readings = GpuReadings.unavailable(reason)

    def read(self) -> GpuReadings:
        with self._lock:
            self.reads += 1
            return self._readings


@dataclass
class OomScriptForTests:
    """Shared by every engine the factory makes: how many calls still raise OOM."""

    remaining: int
    raised: int = 0
    calls: int = 0
    caps: list[int] = field(default_factory=list)
    """``max_num_seqs`` values engines were (re)started with by the manager."""
    starts: int = 0


class OomRaisingEngineForTests:
    """TEST ONLY: wraps the shared engine; its first ``script.remaining`` calls raise a CUDA
    out-of-memory error as PyTorch does. Resizable, so the manager restarts it smaller."""

    def __init__(self, inner: Any, script: OomScriptForTests) -> None:
        self._inner = inner
        self.script = script
        self.model_name = inner.model_name
        self._max_num_seqs = int(inner.max_num_seqs)

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    def set_max_num_seqs(self, value: int) -> None:
        self.script.caps.append(value)
        self._max_num_seqs = min(self._max_num_seqs, value)

    @property
    def max_in_flight(self) -> int:
        return 2 * self._max_num_seqs

    async def start(self) -> None:
        self.script.starts += 1

    async def stop(self) -> None:
        return None  # the shared engine stays up for other tests

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        import torch

        self.script.calls += 1
        if self.script.remaining > 0:
            self.script.remaining -= 1
            self.script.raised += 1
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                "of 79.15 GiB of which 1.02 GiB is free."
            )
        return await self._inner.run(url, body, request_id)
