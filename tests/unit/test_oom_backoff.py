"""CUDA out-of-memory handling below the worker: detection, the window, the engine restart.

Engines here are FAKES (no inference); the worker-level path runs on the real engine in
tests/integration/test_gpu_guard_server.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineOutOfMemory, EngineResult, ResizableEngine, is_cuda_oom
from vllm_batch.engines.manager import EngineManager
from vllm_batch.engines.vllm_engine import VllmEngine, engine_argv, error_result
from vllm_batch.pipeline.dispatch import Dispatcher, execute_line
from vllm_batch.pipeline.line_result import LineResult

LINE = orjson.dumps(
    {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
)
OK = EngineResult(status_code=200, body_json="{}")


class ResizableFakeEngineForTests:
    """FAKE engine with a ``max_num_seqs`` the manager may lower before ``start``."""

    def __init__(self, name: str, events: list[str], max_num_seqs: int = 64) -> None:
        self.model_name = name
        self.events = events
        self._max_num_seqs = max_num_seqs

    @property
    def max_num_seqs(self) -> int:
        return self._max_num_seqs

    def set_max_num_seqs(self, value: int) -> None:
        self.events.append(f"cap {value}")
        self._max_num_seqs = value

    @property
    def max_in_flight(self) -> int:
        return 2 * self._max_num_seqs

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        return OK


class RaisingFakeEngineForTests:
    """FAKE engine: ``run`` raises ``error`` or returns ``result``; not resizable."""

    model_name = "m"
    max_in_flight = 16

    def __init__(self, error: Exception | None = None, result: EngineResult = OK) -> None:
        self.error = error
        self.result = result
        self.calls = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result


def test_cuda_oom_is_recognised_by_type_message_and_cause() -> None:
    import torch

    assert is_cuda_oom(torch.cuda.OutOfMemoryError("Tried to allocate 2 GiB"))
    assert is_cuda_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    try:
        try:
            raise torch.cuda.OutOfMemoryError("x")
        except Exception as inner:
            raise ValueError("engine step failed") from inner
    except ValueError as outer:
        assert is_cuda_oom(outer)
    assert not is_cuda_oom(RuntimeError("out of range"))
    assert not is_cuda_oom(MemoryError("host memory"))
    assert not is_cuda_oom(None)


async def test_an_oom_raised_by_the_engine_is_not_a_failed_line() -> None:
    import torch

    engine = RaisingFakeEngineForTests(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(EngineOutOfMemory):
        await execute_line(engine, 0, LINE, "r0")
    other = RaisingFakeEngineForTests(RuntimeError("tokenizer exploded"))
    result = await execute_line(other, 0, LINE, "r0")
    assert result.is_error  # anything else stays that one line's error


async def test_an_oom_500_result_is_raised_at_once_without_5xx_retries() -> None:
    oom = error_result(500, "InternalServerError", "CUDA out of memory. Tried to allocate 1 GiB")
    engine = RaisingFakeEngineForTests(result=oom)
    with pytest.raises(EngineOutOfMemory, match="CUDA out of memory"):
        await execute_line(engine, 0, LINE, "r0")
    assert engine.calls == 1


async def test_dispatcher_keeps_to_the_window_it_is_given() -> None:
    running = peak = 0

    class Counting(RaisingFakeEngineForTests):
        async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return OK

    results: list[LineResult] = []
    dispatcher = Dispatcher(Counting(), results.append, str, max_in_flight=3)
    await dispatcher.run((i, LINE) for i in range(20))
    assert len(results) == 20 and peak == 3


async def test_shrink_halves_window_and_max_num_seqs_and_restarts_smaller() -> None:
    events: list[str] = []
    engines = EngineManager(
        [ModelSpec("m", "m")], lambda spec: ResizableFakeEngineForTests(spec.name, events)
    )
    engine = await engines.get("m")
    assert engines.in_flight_window(engine) == 128

    step = await engines.shrink("m", min_in_flight=4, min_num_seqs=2)
    assert step is not None and step.restarted
    assert (step.in_flight, step.max_num_seqs) == ((128, 64), (64, 32))
    assert engines.loaded_model is None  # stopped: the next get starts it with 32
    engine = await engines.get("m")
    assert events == ["start", "stop", "cap 32", "start"]
    assert engines.in_flight_window(engine) == 64
    assert engines.describe(details=False)["oom_limits"] == {
        "m": {"max_in_flight": 64, "max_num_seqs": 32}
    }

    floors = []
    while (step := await engines.shrink("m", min_in_flight=4, min_num_seqs=2)) is not None:
        floors.append((step.in_flight, step.max_num_seqs))
        engine = await engines.get("m")
    assert floors[-1] == ((8, 4), (4, 2))
    assert engines.in_flight_window(engine) == 4 and engine.max_num_seqs == 2  # type: ignore[attr-defined]


async def test_shrink_of_an_engine_without_max_num_seqs_only_narrows_the_window() -> None:
    engines = EngineManager([ModelSpec("m", "m")], lambda spec: RaisingFakeEngineForTests())
    engine = await engines.get("m")
    step = await engines.shrink("m", min_in_flight=4, min_num_seqs=2)
    assert step is not None and not step.restarted
    assert (step.in_flight, step.max_num_seqs) == ((16, 8), None)
    assert engines.loaded_model == "m" and engines.in_flight_window(engine) == 8
    assert await engines.shrink("m", min_in_flight=4, min_num_seqs=2) is not None  # 8 -> 4
    assert await engines.shrink("m", min_in_flight=4, min_num_seqs=2) is None  # floored


def test_vllm_arguments_take_the_lowered_max_num_seqs() -> None:
    settings = Settings(max_num_seqs=256)
    spec = ModelSpec("m", "/models/m")
    argv = engine_argv(spec, settings)
    assert argv[argv.index("--max-num-seqs") + 1] == "256"
    argv = engine_argv(spec, settings, max_num_seqs=32)
    assert argv[argv.index("--max-num-seqs") + 1] == "32"
    engine = VllmEngine(spec, settings)  # not started: vLLM is imported only by start
    assert isinstance(engine, ResizableEngine) and engine.max_num_seqs == 256
    engine.set_max_num_seqs(32)
    assert engine.max_num_seqs == 32 and engine.max_in_flight == 64
