"""The media-URL guard (``net/media_url.py``): which URLs of a body are found, which are
refused and why, the lookup cache, and refused lines in the shared pipeline (server and
``vllm-batch run``): an error line with code ``url_not_allowed``, never sent to the engine.

No network: literal addresses need no lookup, host names go to fake resolvers.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_offline_runner import Factory, FakeEngine, options, read_lines, request
from vllm_batch.engines.engine import EngineResult
from vllm_batch.net.media_url import (
    ALLOW_SETTING,
    CachingResolver,
    MediaGuard,
    media_urls,
)
from vllm_batch.offline import run_batch
from vllm_batch.pipeline.dispatch import Dispatcher, execute_line
from vllm_batch.pipeline.line_result import LineResult
from vllm_batch.pipeline.output import ErrorShape

PNG = "data:image/png;base64,iVBORw0KGgo="


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(*parts: dict[str, Any]) -> dict[str, Any]:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}]}


class Resolver:
    """A fake resolver: fixed answers, counts lookups, can fail."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        await asyncio.sleep(0)
        if host not in self.answers:
            raise OSError("Name or service not known")
        return self.answers[host]


NO_LOOKUPS = Resolver({})


def check(body: Any, allow: tuple[str, ...] = (), resolver: Any = NO_LOOKUPS) -> Any:
    return asyncio.run(MediaGuard(allow, resolver).check(body))


def test_media_urls_are_found_in_every_place_vllm_fetches_from() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    image("http://a/1.png"),
                    {"type": "video_url", "video_url": {"url": "http://a/v.mp4"}},
                    {"type": "audio_url", "audio_url": {"url": "http://a/s.wav"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    {"image_url": "http://a/bare.png", "uuid": "u1"},  # vLLM's no-type form
                ],
            },
        ],
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://b/"}]}],
        "response_format": {"json_schema": {"schema": {"properties": {"image_url": {}}}}},
    }
    assert list(media_urls(body)) == [
        ("messages[1].content[1].image_url.url", "http://a/1.png"),
        ("messages[1].content[2].video_url.url", "http://a/v.mp4"),
        ("messages[1].content[3].audio_url.url", "http://a/s.wav"),
        ("messages[1].content[5].image_url", "http://a/bare.png"),
        ("input[0].content[0].image_url", "http://b/"),
    ]
    assert list(media_urls({"messages": [{"role": "user", "content": "hi"}]})) == []
    assert list(media_urls("not a body")) == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8000/cat.png", "loopback address: 127.0.0.1"),
        ("http://[::1]/cat.png", "loopback address: ::1"),
        ("http://[::ffff:127.0.0.1]/cat.png", "loopback address"),
        ("http://10.0.0.1/cat.png", "private address: 10.0.0.1"),
        ("http://192.168.1.20/cat.png", "private address: 192.168.1.20"),
        ("http://172.16.5.4/cat.png", "private address: 172.16.5.4"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata service address"),
        ("http://169.254.1.1/x", "link-local address"),
        ("http://100.64.0.1/x", "shared (CGNAT) address"),
        ("http://0.0.0.0/x", "unspecified address"),
        ("file:///etc/passwd", "file: URLs are not allowed"),
        ("ftp://example.com/cat.png", "not the scheme 'ftp'"),
        ("cat.png", "it has no scheme"),
        ("http://user:pw@example.com/cat.png", "must not carry credentials"),
        ("http://evil.com\\@127.0.0.1/", "is ambiguous (URL parsers disagree on its host)"),
        ("http://127.0.0.1:80\\@evil.com/", "is ambiguous"),
        ("http://localhost/cat.png", "loopback address: localhost (127.0.0.1)"),
        ("http://nowhere.invalid/cat.png", "host 'nowhere.invalid' does not resolve"),
    ],
)
def test_refused_urls_name_the_part_and_the_reason(url: str, why: str) -> None:
    resolver = Resolver({"localhost": ["127.0.0.1"]})
    refusal = check(chat(image(url)), resolver=resolver)
    assert refusal is not None and refusal.param == "messages[0].content[1].image_url.url"
    assert refusal.message.startswith("messages[0].content[1].image_url.url: ")
    assert why in refusal.message
    if "address" in why:
        assert ALLOW_SETTING in refusal.message


def test_public_data_and_allowed_urls_pass() -> None:
    resolver = Resolver({"images.example.com": ["93.184.215.14", "2606:2800:21f:cb07::1"]})
    body = chat(
        image(PNG),
        image("https://8.8.8.8/cat.png"),
        image("https://images.example.com/cat.png?sig=1"),
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    )
    assert check(body, resolver=resolver) is None
    # the allow list names hosts, IPs or CIDRs, as for webhooks and audio
    assert check(chat(image("http://127.0.0.1:9/x.png")), allow=("127.0.0.1",)) is None
    assert check(chat(image("http://10.1.2.3/x.png")), allow=("10.0.0.0/8",)) is None
    internal = Resolver({"media.internal": ["10.0.0.7"]})
    assert check(chat(image("http://media.internal/x")), ("media.internal",), internal) is None
    assert check(chat(image("http://media.internal/x")), (), internal) is not None


def test_the_first_refused_url_is_reported_and_the_query_is_not_shown() -> None:
    body = chat(image(PNG), image("http://10.0.0.1/a.png?token=secret"), image("file:///x"))
    refusal = check(body)
    assert refusal is not None and refusal.param == "messages[0].content[2].image_url.url"
    assert "'http://10.0.0.1/a.png'" in refusal.message and "secret" not in refusal.message


def test_a_host_is_looked_up_once_per_ttl_also_concurrently() -> None:
    now = [0.0]
    resolver = Resolver({"img.example.com": ["93.184.215.14"]})
    cache = CachingResolver(resolver, ttl=60, clock=lambda: now[0])
    guard = MediaGuard((), cache)
    body = chat(image("https://img.example.com/a.png"), image("https://IMG.example.com/b.png"))

    async def many() -> list[Any]:
        return await asyncio.gather(*(guard.check(body) for _ in range(50)))

    assert asyncio.run(many()) == [None] * 50
    assert resolver.calls == ["img.example.com"]
    now[0] = 61.0
    assert asyncio.run(guard.check(body)) is None
    assert len(resolver.calls) == 2


def test_a_failed_lookup_is_cached_too() -> None:
    resolver = Resolver({})
    guard = MediaGuard((), CachingResolver(resolver))

    async def twice() -> list[Any]:
        return [await guard.check(chat(image("http://gone.example/x"))) for _ in range(2)]

    first, second = asyncio.run(twice())
    assert first == second and first is not None and "does not resolve" in first.message
    assert resolver.calls == ["gone.example"]


class Engine:
    """Records what reaches it and answers 200."""

    model_name = "tiny"
    max_in_flight = 4

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        self.bodies.append(body)
        return EngineResult(200, '{"ok": true}')


def line(custom_id: str, body: dict[str, Any]) -> bytes:
    data = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**data, "body": body}).encode()


@pytest.mark.parametrize("shape", list(ErrorShape))
def test_a_refused_line_is_an_error_line_that_never_reaches_the_engine(shape: ErrorShape) -> None:
    engine = Engine()
    raw = line("img", chat(image("http://169.254.169.254/latest/")))
    result = asyncio.run(execute_line(engine, 0, raw, "r0", shape=shape, media=MediaGuard()))
    assert result.is_error and result.seconds is None and engine.bodies == []
    out = json.loads(result.data)
    assert out["custom_id"] == "img" and out["response"]["status_code"] == 400
    param = "messages[0].content[1].image_url.url"
    if shape is ErrorShape.OPENAI:
        assert out["error"]["code"] == "url_not_allowed"
        assert out["error"]["message"].startswith(f"{param}: 'http://169.254.169.254/latest/'")
        error = out["response"]["body"]["error"]
        assert error["code"] == "url_not_allowed" and error["param"] == param
        assert error["type"] == "invalid_request_error"
    else:  # vLLM's ErrorResponse, as ``vllm run-batch`` writes it
        error = out["error"]["error"]
        assert error["code"] == 400 and error["param"] == param
        assert "cloud metadata service" in error["message"]


def test_the_dispatcher_guards_by_default() -> None:
    engine = Engine()
    results: list[LineResult] = []
    lines = [
        line("text", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
        line("loop", chat(image("http://127.0.0.1:1/x.png"))),
        line("data", chat(image(PNG))),
    ]
    source = ((i, raw) for i, raw in enumerate(lines))
    asyncio.run(Dispatcher(engine, results.append, str).run(source))
    errors = {r.line for r in results if r.is_error}
    assert errors == {1} and len(engine.bodies) == 2


def test_vllm_batch_run_refuses_the_same_lines(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    media = {
        1: chat(image("http://127.0.0.1:9/cat.png")),
        2: chat({"type": "video_url", "video_url": {"url": "http://10.0.0.1/v.mp4"}}),
    }
    rows = [line(f"req-{i}", media[i]).decode() if i in media else request(i) for i in range(4)]
    inp.write_text("\n".join(rows) + "\n")
    factory = Factory(FakeEngine())
    summary = run_batch(options(inp, tmp_path / "out.jsonl"), factory)
    out = read_lines(tmp_path / "out.jsonl")
    assert summary.total == 4 and summary.errors == 2
    assert sorted(factory.engine.seen) == ["q0", "q3"]
    assert out[1]["error"]["error"]["param"] == "messages[0].content[1].image_url.url"
    assert "loopback" in out[1]["error"]["error"]["message"]
    assert "private address: 10.0.0.1" in out[2]["error"]["error"]["message"]
    assert out[0]["error"] is None and out[3]["error"] is None
