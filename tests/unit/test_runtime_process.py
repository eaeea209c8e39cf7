"""runtime/process.py with FAKE tasks and the benchmark-only instant engine (no inference):
supervised services restart and stop together, engines are built from the settings, and a
preloaded engine is closed on the way out."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.unit.test_engine_manager import FakeEngineForTests
from vllm_batch.config import Settings
from vllm_batch.engines.instant import InstantBenchmarkEngine
from vllm_batch.runtime.process import Services, make_engines, preloading


async def test_a_dying_service_restarts_and_all_stop_on_shutdown() -> None:
    shutdown = asyncio.Event()
    services = Services(shutdown)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")
        await shutdown.wait()

    health = services.start("flaky", flaky)
    while runs < 2:
        await asyncio.sleep(0.05)
    assert health.running and health.restarts == 1 and health.last_error == "RuntimeError: boom"
    shutdown.set()
    await asyncio.wait_for(services.wait(), 5)
    assert not health.running and services.health == [health]


async def test_cancel_ends_a_task_that_ignores_shutdown() -> None:
    services = Services(asyncio.Event())
    stuck = asyncio.create_task(asyncio.sleep(3600))
    services.add(stuck)
    await asyncio.wait_for(services.cancel(), 5)
    assert stuck.cancelled()


async def test_engines_come_from_the_settings_and_a_preload_is_closed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine="instant-benchmark", models=["tiny=/models/tiny"])
    engines = make_engines(settings)
    async with preloading(engines):
        while engines.current is None:
            await asyncio.sleep(0.01)
        assert isinstance(engines.current, InstantBenchmarkEngine)
        assert engines.loaded_model == "tiny"
    assert engines.current is None and engines.state == "idle"

    log: list[str] = []
    given = make_engines(settings, lambda spec: FakeEngineForTests(spec.name, set(), log))
    assert given.model_names == ["tiny"]
    assert await given.get("tiny") is not None and log == ["start tiny"]
    await given.close()
    assert log == ["start tiny", "stop tiny"]
