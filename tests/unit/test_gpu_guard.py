"""The GPU guard's policy on injected readings, NVML decoding, and "no GPU" here."""

from __future__ import annotations

import json
import logging
import sys
import types
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from tests.gpu_fakes import ScriptedReadingsForTests, gpu
from vllm_batch.config import Settings
from vllm_batch.observability.gpu import GpuReadings, NvmlReader, decode_throttle_reasons
from vllm_batch.observability.gpu_guard import GpuGuard


def guard_for(source: Any, **settings: Any) -> GpuGuard:
    return GpuGuard(source, Settings(**settings))


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def guard_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU guard")]


async def test_pauses_at_max_temperature_and_resumes_below_resume_temperature(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    source = ScriptedReadingsForTests(gpu(70))
    guard = guard_for(source)  # defaults: pause at 85 °C, resume at 80 °C
    pauses_before = metric("vllm_batch_gpu_pauses_total", reason="temperature") or 0.0

    await guard.refresh()
    assert not guard.paused and guard_lines(caplog) == []

    source.set(gpu(90))
    await guard.refresh()
    assert guard.paused and guard.pause_reason == "GPU 0 at 90 °C (pause at 85 °C)"
    assert metric("vllm_batch_gpu_claims_paused") == 1
    assert metric("vllm_batch_gpu_temperature_celsius", gpu="0") == 90
    assert metric("vllm_batch_gpu_pauses_total", reason="temperature") == pauses_before + 1

    for still_warm in (86, 84, 82):  # hysteresis: below the pause mark is not cool enough
        source.set(gpu(still_warm))
        await guard.refresh()
        assert guard.paused, still_warm
    assert guard.pause_reason == "GPU 0 at 82 °C (resume at 80 °C or below)"

    source.set(gpu(80))
    await guard.refresh()
    assert not guard.paused and guard.pause_reason is None
    assert metric("vllm_batch_gpu_claims_paused") == 0
    assert guard.pauses == 1
    assert metric("vllm_batch_gpu_pauses_total", reason="temperature") == pauses_before + 1
    lines = guard_lines(caplog)
    assert len(lines) == 2, lines  # one line on pause, one on resume, each with its reason
    assert lines[0] == "GPU guard: pausing claims for new work: GPU 0 at 90 °C (pause at 85 °C)"
    assert lines[1].startswith("GPU guard: resuming claims after ")
    assert "cooled down (GPU 0 80 °C)" in lines[1] and "was: GPU 0 at 82 °C" in lines[1]


@pytest.mark.parametrize("reason", ["hw_thermal_slowdown", "sw_thermal_slowdown"])
async def test_thermal_throttling_pauses_even_when_cool(reason: str) -> None:
    source = ScriptedReadingsForTests(gpu(60, "sw_power_cap", reason))
    guard = guard_for(source)
    await guard.refresh()
    assert guard.paused
    assert guard.pause_reason == f"GPU 0 throttled ({reason})"
    assert metric("vllm_batch_gpu_throttled", gpu="0", reason=reason) == 1
    assert metric("vllm_batch_gpu_throttled", gpu="0", reason="hw_slowdown") == 0

    source.set(gpu(60, "sw_power_cap"))
    await guard.refresh()
    assert not guard.paused


async def test_power_cap_throttling_does_not_pause() -> None:
    source = ScriptedReadingsForTests(gpu(78, "sw_power_cap"), gpu(79, "gpu_idle", index=1))
    guard = guard_for(source)
    await guard.refresh()
    assert not guard.paused
    assert metric("vllm_batch_gpu_throttled", gpu="0", reason="sw_power_cap") == 1
    state = guard.state()
    assert [g["throttle_reasons"] for g in state["gpus"]] == [["sw_power_cap"], ["gpu_idle"]]


async def test_any_hot_gpu_pauses_and_thresholds_are_settings() -> None:
    source = ScriptedReadingsForTests(gpu(60), gpu(76, index=1))
    guard = guard_for(
        source,
        gpu_max_temperature=75,
        gpu_resume_temperature=70,
        gpu_pause_throttle_reasons="hw_slowdown",
    )
    await guard.refresh()
    assert guard.paused and guard.pause_reason == "GPU 1 at 76 °C (pause at 75 °C)"
    source.set(gpu(60), gpu(70, "hw_slowdown", index=1))
    await guard.refresh()
    assert guard.paused and guard.pause_reason == "GPU 1 throttled (hw_slowdown)"
    source.set(gpu(60), gpu(70, "hw_thermal_slowdown", index=1))  # not in the list now
    await guard.refresh()
    assert not guard.paused


async def test_disabled_guard_reports_but_never_pauses() -> None:
    guard = guard_for(ScriptedReadingsForTests(gpu(99, "hw_thermal_slowdown")), gpu_guard=False)
    await guard.refresh()
    assert not guard.paused
    state = guard.state()
    assert state["guard"] == "off" and state["gpus"][0]["temperature_celsius"] == 99


async def test_losing_the_readings_while_paused_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    source = ScriptedReadingsForTests(gpu(95))
    guard = guard_for(source)
    await guard.refresh()
    assert guard.paused
    source.set_unavailable("NVML: GPU is lost")
    await guard.refresh()
    assert not guard.paused  # without readings the guard has nothing to hold claims for
    assert "no GPU readings (NVML: GPU is lost)" in guard_lines(caplog)[-1]


async def test_no_gpu_here_is_reported_cleanly() -> None:
    """This machine has no NVIDIA driver: the real reader says so and never raises."""
    reader = NvmlReader()
    readings = reader.read()
    assert readings.available is False and readings.gpus == ()
    assert readings.reason is not None and readings.reason.startswith("NVML: ")
    guard = GpuGuard(reader, Settings())
    await guard.refresh()
    assert not guard.paused
    state = guard.state()
    json.dumps(state)  # JSON-able for /ready and the dashboard
    assert state["available"] is False and state["reason"] == readings.reason
    assert state["claims_paused"] is False and state["gpus"] == []
    assert metric("vllm_batch_gpu_available") == 0


async def test_a_raising_source_counts_as_no_readings() -> None:
    class Broken:
        def read(self) -> GpuReadings:
            raise RuntimeError("boom")

    guard = guard_for(Broken())
    readings = await guard.refresh()
    assert readings.available is False and readings.reason == "GPU readings failed: RuntimeError"


def test_throttle_reason_bits_decode_to_names() -> None:
    assert decode_throttle_reasons(0) == ()
    assert decode_throttle_reasons(0x4 | 0x40) == ("sw_power_cap", "hw_thermal_slowdown")
    assert decode_throttle_reasons(0x8 | 0x20) == ("hw_slowdown", "sw_thermal_slowdown")


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValidationError, match="gpu_resume_temperature"):
        Settings(gpu_max_temperature=80, gpu_resume_temperature=85)
    with pytest.raises(ValueError, match=r"unknown GPU throttle reasons.*hot_gpu"):
        guard_for(ScriptedReadingsForTests(), gpu_pause_throttle_reasons="hot_gpu")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_BATCH_GPU_MAX_TEMPERATURE", "90")
    monkeypatch.setenv("VLLM_BATCH_GPU_RESUME_TEMPERATURE", "82")
    monkeypatch.setenv("VLLM_BATCH_GPU_PAUSE_THROTTLE_REASONS", "hw_slowdown,sw_thermal_slowdown")
    settings = Settings()
    assert (settings.gpu_max_temperature, settings.gpu_resume_temperature) == (90, 82)
    assert settings.gpu_pause_throttle_reasons == ["hw_slowdown", "sw_thermal_slowdown"]


class FakeNvmlForTests(types.ModuleType):
    """TEST ONLY: stands in for the pynvml bindings (NVML units: mW, bytes, bitmask)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        return None

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA L4"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return types.SimpleNamespace(gpu=55, memory=20)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(used=3 << 30, total=24 << 30, free=21 << 30)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return 71 + handle

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return 65_250

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        raise RuntimeError("Not Supported")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return 0x4 | 0x40


def test_nvml_reader_converts_units_and_honours_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvmlForTests()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")
    reader = NvmlReader()
    readings = reader.read()
    assert readings.available and len(readings.gpus) == 1
    (one,) = readings.gpus
    assert (one.index, one.uuid, one.name) == (1, "GPU-1", "NVIDIA L4")
    assert one.utilization_percent == 55 and one.temperature_celsius == 72
    assert (one.memory_used_bytes, one.memory_total_bytes) == (3 << 30, 24 << 30)
    assert one.power_watts == 65.25 and one.power_limit_watts is None  # not supported
    assert one.throttle_reasons == ("sw_power_cap", "hw_thermal_slowdown")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [g.index for g in reader.read().gpus] == [0, 1]
