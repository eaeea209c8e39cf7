"""EngineManager with a FAKE engine (no inference): load failures, backoff, recovery, swaps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from vllm_batch.config import ModelSpec
from vllm_batch.engines.manager import EngineLoadError, EngineManager


class FakeEngineForTests:
    """A pretend engine whose ``start`` fails while its model is in ``broken``."""

    def __init__(self, model_name: str, broken: set[str], log: list[str]) -> None:
        self.model_name = model_name
        self._broken = broken
        self._log = log

    @property
    def max_in_flight(self) -> int:
        return 1

    async def start(self) -> None:
        self._log.append(f"start {self.model_name}")
        if self.model_name in self._broken:
            raise ValueError(f"config.json of {self.model_name} is not JSON")

    async def stop(self) -> None:
        self._log.append(f"stop {self.model_name}")

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        raise NotImplementedError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(
    broken: set[str], log: list[str], clock: Clock, models: tuple[str, ...] = ("a", "b")
) -> EngineManager:
    specs = [ModelSpec(name=m, path=m) for m in models]
    return EngineManager(
        specs,
        lambda spec: FakeEngineForTests(spec.name, broken, log),
        first_retry=5.0,
        max_retry=60.0,
        clock=clock,
    )


def test_load_failure_is_recorded_and_engine_cleaned_up() -> None:
    log: list[str] = []
    clock = Clock()
    engines = manager({"a"}, log, clock)
    with pytest.raises(EngineLoadError, match=r"config\.json of a is not JSON") as info:
        asyncio.run(engines.get("a"))
    assert info.value.model == "a"
    assert engines.state == "failed" and engines.failed and engines.loaded_model is None
    failure = engines.failures["a"]
    assert failure.attempts == 1 and failure.first_failed_at == clock.now
    assert "ValueError" in failure.error
    assert log == ["start a", "stop a"], "a half-started engine must be stopped"
    assert engines.claimable_models() == ["b"]
    public = engines.describe(details=False)["failed_models"]["a"]
    assert public["state"] == "failed" and "error" not in public
    assert "config.json" in engines.describe(details=True)["failed_models"]["a"]["error"]


def test_backoff_doubles_up_to_the_cap_and_blocks_loads_meanwhile() -> None:
    log: list[str] = []
    clock = Clock()
    engines = manager({"a"}, log, clock)
    delays = []
    for attempt in range(1, 8):
        with pytest.raises(EngineLoadError):
            asyncio.run(engines.get("a"))
        failure = engines.failures["a"]
        assert failure.attempts == attempt
        delays.append(failure.retry_at - clock.now)
        # Before the retry time: refused at once, without starting an engine.
        starts = log.count("start a")
        clock.now = failure.retry_at - 0.01
        assert engines.due_retries() == []
        with pytest.raises(EngineLoadError, match="backing off"):
            asyncio.run(engines.get("a"))
        assert log.count("start a") == starts
        clock.now = failure.retry_at
        assert engines.due_retries() == ["a"]
    expected = [5, 10, 20, 40, 60, 60, 60]
    for delay, full in zip(delays, expected, strict=True):
        assert 0.8 * full <= delay <= full, (delays, expected)


def test_recovery_clears_the_failure() -> None:
    log: list[str] = []
    clock = Clock()
    broken = {"a"}
    engines = manager(broken, log, clock)
    with pytest.raises(EngineLoadError):
        asyncio.run(engines.get("a"))
    broken.clear()  # the model was repaired
    clock.now = engines.failures["a"].retry_at
    engine = asyncio.run(engines.get("a"))
    assert engine.model_name == "a"
    assert engines.state == "ready" and engines.loaded_model == "a"
    assert not engines.failed and engines.failures == {}
    assert engines.claimable_models() == ["a", "b"]
    assert engines.next_retry_in() is None


def test_swap_unloads_the_other_model_and_a_failed_swap_leaves_none_loaded() -> None:
    log: list[str] = []
    clock = Clock()
    engines = manager({"b"}, log, clock)

    async def scenario() -> None:
        await engines.get("a")
        assert engines.loaded_model == "a"
        assert await engines.get("a") is await engines.get("a")  # no reload
        with pytest.raises(EngineLoadError):
            await engines.get("b")
        assert engines.loaded_model is None and engines.state == "failed"
        assert engines.claimable_models() == ["a"]
        await engines.get("a")  # the other model still loads
        assert engines.loaded_model == "a" and engines.state == "ready"
        assert engines.failed, "b still cannot load: not ready overall"
        await engines.close()

    asyncio.run(scenario())
    assert log == ["start a", "stop a", "start b", "stop b", "start a", "stop a"]


def test_cancelled_load_is_not_a_failure() -> None:
    clock = Clock()

    class SlowEngine(FakeEngineForTests):
        async def start(self) -> None:
            await asyncio.sleep(10)

    engines = EngineManager(
        [ModelSpec(name="a", path="a")], lambda spec: SlowEngine("a", set(), []), clock=clock
    )

    async def scenario() -> None:
        task = asyncio.create_task(engines.get("a"))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert engines.failures == {} and engines.state == "idle"
