"""The dispatcher on fake engines (pure pipeline logic; no inference needed).

``ScriptedFakeEngine`` answers after a per-request delay and can raise for chosen lines,
so the window, skips, per-line failures, engine failures and halting are all observable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import orjson
import pytest

from vllm_batch.engines.engine import EngineFailure, EngineResult
from vllm_batch.pipeline.dispatch import Dispatcher
from vllm_batch.pipeline.line_result import LineResult


class ScriptedFakeEngine:
    """FAKE ENGINE for dispatcher tests: echoes the prompt, tracks concurrency."""

    model_name = "fake"

    def __init__(
        self,
        window: int = 4,
        *,
        raise_on: dict[str, BaseException] | None = None,
        delay: float = 0.001,
    ) -> None:
        self._window = window
        self.raise_on = raise_on or {}
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.calls: list[str] = []
        self.cancelled = 0

    @property
    def max_in_flight(self) -> int:
        return self._window

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        prompt = body["messages"][-1]["content"]
        self.calls.append(prompt)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if prompt in self.raise_on:
                raise self.raise_on[prompt]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        body_json = orjson.dumps({"echo": prompt}).decode()
        return EngineResult(status_code=200, body_json=body_json, input_tokens=1)


def line(i: int, *, system: str | None = None) -> bytes:
    messages = [{"role": "user", "content": f"p{i}"}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": "fake", "messages": messages}
    return orjson.dumps(
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


def source(n: int) -> Generator[tuple[int, bytes], None, None]:
    for i in range(n):
        yield i, line(i)


async def dispatch(engine: ScriptedFakeEngine, n: int) -> list[LineResult]:
    results: list[LineResult] = []
    await Dispatcher(engine, results.append, lambda i: f"req-{i}").run(source(n))
    return results


async def test_every_line_once_within_the_window() -> None:
    engine = ScriptedFakeEngine(window=4)
    results = await dispatch(engine, 300)
    assert sorted(r.line for r in results) == list(range(300))
    assert engine.peak == 4
    assert all(not r.is_error for r in results)


async def test_skipped_lines_are_not_sent() -> None:
    engine = ScriptedFakeEngine()
    results: list[LineResult] = []
    dispatcher = Dispatcher(engine, results.append, lambda i: f"req-{i}")
    await dispatcher.run(source(20), skip={0, 5, 19})
    assert sorted(r.line for r in results) == [i for i in range(20) if i not in {0, 5, 19}]
    assert "p5" not in engine.calls


@pytest.mark.parametrize("error", [RecursionError("too deep"), ValueError("bad"), KeyError("k")])
async def test_a_failing_request_becomes_its_own_error_line(error: BaseException) -> None:
    engine = ScriptedFakeEngine(raise_on={"p3": error})
    results = await dispatch(engine, 10)
    assert sorted(r.line for r in results) == list(range(10))
    failed = [r for r in results if r.is_error]
    assert [r.line for r in failed] == [3]
    payload = orjson.loads(failed[0].data)
    assert payload["custom_id"] == "c3"
    assert payload["error"]["code"] == "request_failed"
    assert type(error).__name__ in payload["error"]["message"]


async def test_engine_failure_stops_everything_and_raises() -> None:
    engine = ScriptedFakeEngine(window=8, raise_on={"p10": EngineFailure("gpu gone")}, delay=0.01)
    results: list[LineResult] = []
    dispatcher = Dispatcher(engine, results.append, lambda i: f"req-{i}")
    with pytest.raises(EngineFailure):
        await dispatcher.run(source(500))
    assert len(results) < 500
    assert engine.in_flight == 0
    assert len(set(r.line for r in results)) == len(results)


async def test_halt_aborts_in_flight_requests() -> None:
    engine = ScriptedFakeEngine(window=6, delay=10)
    results: list[LineResult] = []
    dispatcher = Dispatcher(engine, results.append, lambda i: f"req-{i}")
    task = asyncio.create_task(dispatcher.run(source(100)))
    while engine.in_flight < 6:
        await asyncio.sleep(0.01)
    dispatcher.halt()
    await asyncio.wait_for(task, 5)
    assert results == []
    assert engine.cancelled == 6 and engine.in_flight == 0


async def test_unreadable_lines_are_error_lines_not_crashes() -> None:
    def broken() -> Generator[tuple[int, bytes], None, None]:
        yield 0, b"{not json"
        yield 1, orjson.dumps({"custom_id": "x", "url": "/v1/chat/completions", "body": []})
        yield 2, line(2)

    engine = ScriptedFakeEngine()
    results: list[LineResult] = []
    await Dispatcher(engine, results.append, lambda i: f"req-{i}").run(broken())
    by_line = {r.line: r for r in results}
    assert by_line[0].is_error and by_line[1].is_error and not by_line[2].is_error
    assert orjson.loads(by_line[1].data)["custom_id"] == "x"


async def test_prefix_grouping_sends_shared_prefixes_together() -> None:
    def mixed() -> Generator[tuple[int, bytes], None, None]:
        for i in range(8):
            yield i, line(i, system="B" if i % 2 == 0 else "A")

    engine = ScriptedFakeEngine(window=1)  # one at a time: the send order is observable
    results: list[LineResult] = []
    await Dispatcher(engine, results.append, lambda i: f"req-{i}").run(mixed())
    assert sorted(r.line for r in results) == list(range(8))
    assert engine.calls == ["p0", "p2", "p4", "p6", "p1", "p3", "p5", "p7"]

    engine = ScriptedFakeEngine(window=1)
    await Dispatcher(engine, results.append, lambda i: "r", group_prefixes=False).run(mixed())
    assert engine.calls == [f"p{i}" for i in range(8)]
