"""The remote engine without a model: settings, AIMD, headers and bodies, and its HTTP
handling against real loopback servers (``tests/fault_proxy.py`` answering by itself)."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.fault_proxy import fault_proxy
from vllm_batch.cli import app
from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineFailure
from vllm_batch.engines.remote import EngineLoadFailed, RemoteEngine, upstream_error, usage_counts
from vllm_batch.engines.upstreams import INITIAL_WINDOW, Aimd, retry_after_seconds

CHAT = "/v1/chat/completions"


def remote_settings(*urls: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "engine": "openai",
        "engine_urls": list(urls),
        "engine_max_concurrency": 4,
        "engine_retry_seconds": 10,
        "engine_health_interval": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def body(model: str = "ours", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


# ------------------------------------------------------------------ settings and CLI


def test_settings_need_upstreams_and_clean_urls() -> None:
    with pytest.raises(ValidationError, match="needs at least one upstream"):
        Settings(engine="openai")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        Settings(engine="openai", engine_urls=["http://user:pw@host:8000/v1"])
    with pytest.raises(ValidationError, match="http"):
        Settings(engine="openai", engine_urls=["ftp://host/v1"])
    with pytest.raises(ValidationError, match="must not exceed"):
        remote_settings("http://h:1/v1", engine_min_concurrency=9, engine_max_concurrency=8)
    settings = Settings(engine="openai", engine_urls="http://a:8000, http://b:9000/v1/")
    assert settings.engine_urls == ["http://a:8000/v1", "http://b:9000/v1"]


def test_cli_refuses_openai_engine_without_upstreams() -> None:
    result = CliRunner().invoke(app, ["worker", "--engine", "openai"])
    assert result.exit_code == 2
    assert "needs at least one upstream" in result.output


def test_cli_discovers_models_or_says_why(tmp_path: Any) -> None:
    from vllm_batch.cli.build import with_upstream_models

    with fault_proxy(models=["m1", "m2"]) as one, fault_proxy(models=["m2", "m3"]) as two:
        found = with_upstream_models(remote_settings(one.url, two.url))
        assert found.served_model_names == ["m1", "m2", "m3"]
        named = with_upstream_models(remote_settings(one.url, models=["x=m1"]))
        assert named.served_model_names == ["x"]
    dead = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(
        app, ["worker", "--engine", "openai", "--engine-url", dead, "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "no upstream answered /models" in result.output


# ------------------------------------------------------------------ pure logic


def test_aimd_slow_start_then_additive_increase() -> None:
    clock = [0.0]
    aimd = Aimd(cap=16, floor=2, clock=lambda: clock[0])
    assert aimd.limit == INITIAL_WINDOW
    for _ in range(12):
        aimd.on_success(0.1, 10, sent_at=0.0)
    assert aimd.limit == 16  # one slot per success up to the cap
    clock[0] = 1.0
    assert aimd.on_congestion(sent_at=0.5)
    assert aimd.limit == 8 and aimd.decreases == 1
    for _ in range(9):  # about one window of successes: one more slot
        aimd.on_success(0.1, 10, sent_at=2.0)
    assert aimd.limit == 9


def test_aimd_halves_once_per_round_trip_and_never_below_the_floor() -> None:
    clock = [10.0]
    aimd = Aimd(cap=64, floor=3, clock=lambda: clock[0])
    aimd.window = 64
    assert aimd.on_congestion(sent_at=9.0)
    assert not aimd.on_congestion(sent_at=9.5)  # sent before the halving: same burst
    assert aimd.limit == 32
    for _ in range(10):
        clock[0] += 1
        aimd.on_congestion(sent_at=clock[0])
    assert aimd.limit == 3


def test_aimd_latency_signal() -> None:
    clock = [0.0]
    aimd = Aimd(cap=32, latency_factor=2.0, clock=lambda: clock[0])
    aimd.window = 32
    for _ in range(20):
        aimd.on_success(0.5, 9, sent_at=0.0)  # 0.05 s per token
    assert aimd.limit == 32 and aimd.decreases == 0
    clock[0] = 5.0
    for _ in range(20):
        aimd.on_success(3.0, 9, sent_at=1.0)  # six times slower
    assert aimd.decreases >= 1 and aimd.limit <= 16
    ignored = Aimd(cap=32, latency_factor=0, clock=lambda: clock[0])
    ignored.window = 32
    for seconds in (0.5, 5.0, 50.0):
        ignored.on_success(seconds, 9, sent_at=0.0)
    assert ignored.decreases == 0


def test_retry_after_header() -> None:
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("100000") == 300.0
    assert retry_after_seconds("-4") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_usage_and_error_bodies() -> None:
    chat = {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 1},
    }
    assert usage_counts(chat) == {
        "input_tokens": 7,
        "cached_tokens": 4,
        "output_tokens": 3,
        "reasoning_tokens": 1,
    }
    responses = {"input_tokens": 5, "output_tokens": 2, "input_tokens_details": None}
    assert usage_counts(responses)["input_tokens"] == 5
    assert usage_counts(None) == {}
    vllm = upstream_error(
        400, {"error": {"message": "bad", "type": "BadRequestError", "param": "n", "code": 400}}
    )
    assert (vllm.status_code, vllm.error_code, vllm.error_message) == (
        400,
        "invalid_request_error",
        "bad",
    )
    assert orjson.loads(vllm.body_json)["error"]["param"] == "n"
    tgi = upstream_error(422, {"error": "Input validation error", "error_type": "validation"})
    assert tgi.status_code == 422 and tgi.error_message == "Input validation error"


# ------------------------------------------------------------------ over HTTP


async def test_request_goes_upstream_with_its_model_name_and_request_id() -> None:
    with fault_proxy(models=["their-name"]) as upstream:
        engine = RemoteEngine(ModelSpec("ours", "their-name"), remote_settings(upstream.url))
        await engine.start()
        try:
            result = await engine.run(CHAT, body(temperature=0, seed=3), "req-1")
            refused = await engine.run(CHAT, body(stream=True), "req-2")
        finally:
            await engine.stop()
    assert result.ok and result.input_tokens == 5 and result.output_tokens == 1
    sent = upstream.posts()
    assert len(sent) == 1  # the streaming line never left
    assert sent[0].body == body("their-name", temperature=0, seed=3)
    assert sent[0].headers["x-request-id"] == "req-1"
    assert orjson.loads(result.body_json)["id"] == "chatcmpl-req-1"
    assert refused.status_code == 400 and "Streaming" in (refused.error_message or "")


async def test_api_key_is_sent_upstream() -> None:
    with fault_proxy(models=["m"]) as upstream:
        settings = remote_settings(upstream.url, engine_api_key="sk-up")
        engine = RemoteEngine(ModelSpec("m", "m"), settings)
        await engine.start()
        try:
            await engine.run(CHAT, body("m"), "r")
        finally:
            await engine.stop()
    assert {s.headers.get("authorization") for s in upstream.seen} == {"Bearer sk-up"}


async def test_a_4xx_is_the_lines_error() -> None:
    with fault_proxy(models=["m"], plan=lambda n: 400) as upstream:
        engine = RemoteEngine(ModelSpec("m", "m"), remote_settings(upstream.url))
        await engine.start()
        try:
            result = await engine.run(CHAT, body("m"), "r")
        finally:
            await engine.stop()
    assert result.status_code == 400 and result.error_message == "injected 400"
    assert len(upstream.posts()) == 1  # not retried


async def test_429_waits_for_retry_after_then_succeeds() -> None:
    with fault_proxy(models=["m"], plan=lambda n: 429 if n < 2 else None) as upstream:
        engine = RemoteEngine(ModelSpec("m", "m"), remote_settings(upstream.url))
        await engine.start()
        try:
            result = await engine.run(CHAT, body("m"), "r")
        finally:
            await engine.stop()
    assert result.ok
    posts = upstream.posts()
    assert [p.answered for p in posts] == [429, 429, 200]
    for earlier, later in itertools.pairwise(posts):
        assert later.at - earlier.answered_at >= 0.95  # Retry-After: 1


async def test_503_fails_over_to_another_upstream() -> None:
    with (
        fault_proxy(models=["m"], plan=lambda n: 503, retry_after=None) as sick,
        fault_proxy(models=["m"]) as well,
    ):
        engine = RemoteEngine(ModelSpec("m", "m"), remote_settings(sick.url, well.url))
        await engine.start()
        try:
            results = [await engine.run(CHAT, body("m"), f"r{i}") for i in range(8)]
            assert engine.pool is not None
            states = {u.url: u.healthy for u in engine.pool.upstreams}
        finally:
            await engine.stop()
    assert all(r.ok for r in results)
    assert len(well.posts()) == 8
    assert len(sick.posts()) == 1  # after a failure, an upstream goes last in the choice
    assert states == {sick.url: True, well.url: True}


async def test_failing_upstream_leaves_rotation_and_is_probed_less_often() -> None:
    with fault_proxy(models=["m"], plan=lambda n: 503, retry_after=None) as sick:
        settings = remote_settings(sick.url, engine_retry_seconds=1.5)
        engine = RemoteEngine(ModelSpec("m", "m"), settings)
        await engine.start()
        try:
            with pytest.raises(EngineFailure, match="HTTP 503"):
                await engine.run(CHAT, body("m"), "r")
            assert engine.pool is not None
            trips = engine.pool.upstreams[0].trips
        finally:
            await engine.stop()
    # down after 3 failures in a row, taken back by a probe 0.2 s later, down again after
    # 3 more, probed after 0.4 s, ...: at most 3 attempts per trip (and the last one's)
    assert 1 <= trips <= 4
    assert 3 <= len(sick.posts()) <= 3 * trips + 3


async def test_dead_upstream_is_taken_back_when_it_answers_again() -> None:
    port = free_port()
    with fault_proxy(models=["m"]) as alive:
        settings = remote_settings(f"http://127.0.0.1:{port}/v1", alive.url)
        engine = RemoteEngine(ModelSpec("m", "m"), settings)
        await engine.start()
        try:
            assert engine.pool is not None
            assert [u.healthy for u in engine.pool.upstreams] == [False, True]
            with fault_proxy(models=["m"], port=port) as revived:
                deadline = time.monotonic() + 10
                while not engine.pool.upstreams[0].healthy:
                    assert time.monotonic() < deadline, "never taken back"
                    await _sleep(0.05)
                for i in range(8):
                    assert (await engine.run(CHAT, body("m"), f"r{i}")).ok
                assert revived.posts(), "the revived upstream got no work"
        finally:
            await engine.stop()


async def test_no_upstream_for_too_long_is_an_engine_failure() -> None:
    port = free_port()
    with fault_proxy(models=["m"], port=port) as upstream:
        settings = remote_settings(upstream.url, engine_retry_seconds=1.0)
        engine = RemoteEngine(ModelSpec("m", "m"), settings)
        await engine.start()
    try:  # the upstream is gone now
        started = time.monotonic()
        with pytest.raises(EngineFailure, match="no upstream answered"):
            await engine.run(CHAT, body("m"), "r")
        assert 0.9 <= time.monotonic() - started < 5
    finally:
        await engine.stop()
    with pytest.raises(EngineLoadFailed, match="is down"):
        await RemoteEngine(ModelSpec("m", "m"), settings).start()
    not_served = r"does not serve it \(its /models lists other"
    with (
        fault_proxy(models=["other"], port=port),
        pytest.raises(EngineLoadFailed, match=not_served),
    ):
        await RemoteEngine(ModelSpec("m", "m"), settings).start()


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
