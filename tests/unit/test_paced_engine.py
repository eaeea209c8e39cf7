"""The gate that paces an engine for mid-batch tests: requests beyond the allowance wait
(cancellably) until the test raises it; each process's starts are counted."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tests.paced import Gate, PacedEngine


class EchoEngineForTests:
    """Answers at once with the request id (no inference)."""

    model_name = "echo"

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> str:
        return request_id


async def test_requests_beyond_the_allowance_wait_until_it_is_raised(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    gate.allow(2)
    engine = PacedEngine(EchoEngineForTests(), gate.path)
    assert engine.model_name == "echo"  # everything else is the wrapped engine's
    tasks = [asyncio.create_task(engine.run("/v1/x", {}, f"r{i}")) for i in range(4)]
    await asyncio.sleep(0.3)
    assert sum(t.done() for t in tasks) == 2
    assert gate.started(os.getpid()) == 2
    gate.allow(3)
    await asyncio.sleep(0.3)
    assert sum(t.done() for t in tasks) == 3
    gate.allow(None)  # no limit
    assert sorted(await asyncio.gather(*tasks)) == ["r0", "r1", "r2", "r3"]
    assert gate.started(os.getpid()) == 4


async def test_a_held_request_can_be_cancelled(tmp_path: Path) -> None:
    gate = Gate(tmp_path / "gate")
    gate.allow(0)
    task = asyncio.create_task(PacedEngine(EchoEngineForTests(), gate.path).run("/", {}, "r"))
    await asyncio.sleep(0.1)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert task in done and task.cancelled()
