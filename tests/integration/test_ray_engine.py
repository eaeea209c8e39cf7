"""``RayEngine``'s own logic on a real private Ray instance, with replicas holding the
instant-benchmark engine (no inference, so replicas start in a second or two). The real vLLM
engine on a Ray cluster, and a replica killed mid-batch, are in tests/e2e/test_ray_executor.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import psutil
import pytest

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineFailure
from vllm_batch.engines.ray_engine import RayEngine

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def engine() -> AsyncIterator[RayEngine]:
    """Two replicas that Ray never restarts, on a private Ray instance of this process."""
    settings = Settings(
        engine="instant-benchmark",
        executor="ray",
        ray_replicas=2,
        ray_cpus_per_replica=0,
        ray_max_restarts=0,
    )
    engine = RayEngine(ModelSpec("m", "m"), settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids):
        assert time.monotonic() < deadline, f"still running: {pids}"
        time.sleep(0.2)


async def test_requests_spread_over_replicas_and_stop_ends_them(engine: RayEngine) -> None:
    import ray

    pids = [r.info.pid for r in engine.replicas if r.info is not None]
    assert len(set(pids)) == 2 and engine.max_in_flight == 2 * 512
    tasks = [
        asyncio.create_task(engine.run("/v1/chat/completions", BODY, f"r{i}")) for i in range(64)
    ]
    await asyncio.sleep(0)  # every task has sent its request
    assert [r.in_flight for r in engine.replicas] == [32, 32]
    results = await asyncio.gather(*tasks)
    assert all(r.ok and '"id":"cmpl-r' in r.body_json for r in results)
    assert [r.in_flight for r in engine.replicas] == [0, 0]
    await engine.stop()
    assert not ray.is_initialized()  # the private instance is gone with the engine
    wait_gone(pids)


async def test_a_dead_replicas_requests_go_to_the_other_then_none_is_left(
    engine: RayEngine,
) -> None:
    first, second = (r.info.pid for r in engine.replicas if r.info is not None)
    os.kill(first, signal.SIGKILL)
    wait_gone([first])
    # Half of these go to the dead replica first (it is not known dead yet) and are re-sent.
    results = await asyncio.gather(
        *(engine.run("/v1/chat/completions", BODY, f"r{i}") for i in range(20))
    )
    assert all(r.ok for r in results)
    revive = engine.replicas[0].revive
    assert revive is not None  # it was found dead while a request was on it
    await asyncio.wait_for(revive, 30)
    assert [r.state for r in engine.replicas] == ["dead", "up"]
    os.kill(second, signal.SIGKILL)
    with pytest.raises(EngineFailure, match="no Ray replica of m is left"):
        await asyncio.wait_for(engine.run("/v1/completions", BODY, "after"), 60)
    assert {r.state for r in engine.replicas} == {"dead"}
