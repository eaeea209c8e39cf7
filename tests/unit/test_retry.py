"""``vllm_batch.retry``: the one retry policy (tenacity), and the 5xx retries built on it.

``FlakyEngine`` is a fake for pure retry logic; the real engine never returns 5xx on demand.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from vllm_batch.engines.engine import EngineResult
from vllm_batch.pipeline import dispatch
from vllm_batch.pipeline.dispatch import execute_line
from vllm_batch.pipeline.output import ErrorShape
from vllm_batch.retry import retrying, retrying_sync

log = logging.getLogger("tests.retry")


class Flaky:
    """Raises ``errors`` in turn, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def _sync(call: Flaky, delays: list[float], **kwargs: Any) -> str:
    policy = retrying_sync(log=log, what="thing", sleep=delays.append, **kwargs)
    for attempt in policy:
        with attempt:
            return call()
    raise AssertionError("unreachable")


def test_retries_then_succeeds_with_jittered_exponential_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tests.retry")
    delays: list[float] = []
    call = Flaky(OSError("disk"), OSError("disk"), OSError())
    assert _sync(call, delays, on=OSError, attempts=5, max_wait=60, first_wait=1.0) == "ok"
    assert call.calls == 4 and len(delays) == 3
    for n, delay in enumerate(delays):
        assert 2**n <= delay <= 2**n + 1.0
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert messages[0].startswith("thing failed (attempt 1/5: OSError: disk); retrying in ")
    assert messages[2].startswith("thing failed (attempt 3/5: OSError); retrying in ")


def test_gives_up_with_the_original_exception() -> None:
    delays: list[float] = []
    call = Flaky(*(TimeoutError(str(i)) for i in range(9)))
    with pytest.raises(TimeoutError, match=r"^2$"):
        _sync(call, delays, on=(OSError, TimeoutError), attempts=3, max_wait=1)
    assert call.calls == 3 and len(delays) == 2


def test_other_exceptions_are_not_retried() -> None:
    delays: list[float] = []
    call = Flaky(ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        _sync(call, delays, on=OSError, attempts=3, max_wait=1)
    assert call.calls == 1 and delays == []


def test_a_predicate_chooses_what_to_retry() -> None:
    delays: list[float] = []
    only_busy = lambda error: "busy" in str(error)  # noqa: E731
    assert _sync(Flaky(OSError("busy")), delays, on=only_busy, attempts=2, max_wait=1) == "ok"
    with pytest.raises(OSError, match="gone"):
        _sync(Flaky(OSError("gone")), delays, on=only_busy, attempts=2, max_wait=1)
    assert len(delays) == 1


def test_waits_are_capped_by_max_wait() -> None:
    delays: list[float] = []
    call = Flaky(*(OSError() for _ in range(8)))
    _sync(call, delays, on=OSError, attempts=None, max_wait=3.0, first_wait=1.0)
    assert len(delays) == 8 and max(delays) == 3.0 and delays[-1] == 3.0


def test_async_retries_forever_when_attempts_is_none(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tests.retry")
    delays: list[float] = []

    async def record(delay: float) -> None:
        delays.append(delay)

    call = Flaky(*(ConnectionError("db down") for _ in range(20)))

    async def go() -> str:
        policy = retrying(
            on=ConnectionError, attempts=None, max_wait=30, log=log, what="db", sleep=record
        )
        async for attempt in policy:
            with attempt:
                return call()
        raise AssertionError("unreachable")

    assert asyncio.run(go()) == "ok" and call.calls == 21 and len(delays) == 20
    assert "db failed (attempt 20/∞: ConnectionError: db down)" in caplog.records[-1].getMessage()


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        retrying_sync(on=OSError, attempts=0, max_wait=1, log=log, what="x")


class FlakyEngine:
    """Answers 503 ``failures`` times, then 200; records the request ids it was given."""

    model_name = "tiny"
    max_in_flight = 1

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.request_ids: list[str] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        self.request_ids.append(request_id)
        if len(self.request_ids) <= self.failures:
            error = {"error": {"message": "busy", "type": "ServiceUnavailableError"}}
            return EngineResult(503, json.dumps(error), "server_error", "busy")
        return EngineResult(200, '{"choices": []}', output_tokens=1)


RAW = json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {}}).encode()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "RETRY_BACKOFF_SECONDS", 0.001)


def test_execute_line_retries_5xx_then_succeeds() -> None:
    engine = FlakyEngine(failures=2)
    result = asyncio.run(execute_line(engine, 0, RAW, "req"))
    assert not result.is_error and json.loads(result.data)["response"]["status_code"] == 200
    assert engine.request_ids == ["req", "req-retry1", "req-retry2"]


def test_execute_line_writes_the_last_5xx_after_its_retries() -> None:
    engine = FlakyEngine(failures=99)
    result = asyncio.run(execute_line(engine, 0, RAW, "req", shape=ErrorShape.VLLM))
    assert len(engine.request_ids) == dispatch.TRANSIENT_RETRIES + 1
    line = json.loads(result.data)
    assert result.is_error and line["response"]["status_code"] == 503
    assert line["error"]["error"]["code"] == 503 and line["error"]["error"]["message"] == "busy"
