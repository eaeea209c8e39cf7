"""TEST HELPER: a real HTTP server on loopback, in front of an OpenAI-compatible upstream,
that injects faults into chosen requests (never part of the product).

``FaultProxy`` forwards every request to ``target`` (a real ``vllm`` OpenAI server) unless
the fault plan says otherwise: answer 429 with ``Retry-After``, or 503. Lost connections
are tested by stopping the proxy or killing the real upstream. Without a target it answers
itself (``/v1/models`` lists ``models``; a POST gets a small chat completion naming the
body's model and echoing ``X-Request-Id``), for fast tests of the remote engine's HTTP
handling. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.conftest import free_port

Fault = int | None
"""An HTTP status to answer with, or None (pass the request on)."""


@dataclass
class Seen:
    """One request the proxy received, and what it did with it."""

    method: str
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]
    at: float
    answered: int
    answered_at: float = 0.0


@dataclass
class FaultProxy:
    """Faults come from ``plan(n)`` for the n-th POST (0-based); GETs always pass."""

    port: int
    target: str | None
    models: list[str]
    plan: Callable[[int], Fault] = lambda n: None
    retry_after: str | None = "1"
    latency: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _posts: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def posts(self) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.method == "POST"]

    def faults(self) -> list[Seen]:
        return [s for s in self.posts() if s.answered != 200]

    async def handle(self, request: Request) -> Response:
        raw = await request.body()
        body = orjson.loads(raw) if raw else None
        fault = self.plan(next(self._posts)) if request.method == "POST" else None
        seen = Seen(
            request.method,
            request.url.path,
            body,
            {k.lower(): v for k, v in request.headers.items()},
            time.monotonic(),
            fault if fault is not None else 200,
        )
        with self.lock:
            self.seen.append(seen)
        if fault is not None:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            error = {"error": {"message": f"injected {fault}", "type": "Injected", "code": fault}}
            seen.answered_at = time.monotonic()
            return Response(orjson.dumps(error), fault, headers, "application/json")
        response = await self._answer(request, raw, body)
        seen.answered, seen.answered_at = response.status_code, time.monotonic()
        return response

    async def _answer(self, request: Request, raw: bytes, body: Any) -> Response:
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.target is None:
            return self._own_answer(request, body)
        path = request.url.path.removeprefix("/v1")
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "x-request-id")
        }
        async with httpx.AsyncClient(timeout=120) as client:
            upstream = await client.request(
                request.method,
                f"{self.target}{path}",
                content=raw,
                headers={**headers, "content-type": "application/json"},
            )
        return Response(upstream.content, upstream.status_code, media_type="application/json")

    def _own_answer(self, request: Request, body: Any) -> Response:
        if request.method == "GET":
            data = [{"id": m, "object": "model"} for m in self.models]
            return Response(orjson.dumps({"object": "list", "data": data}), 200)
        model = body.get("model") if isinstance(body, dict) else None
        if model not in self.models:
            message = f"The model `{model}` does not exist."
            error = {"error": {"message": message, "type": "NotFoundError", "param": "model"}}
            return Response(orjson.dumps(error), 404, media_type="application/json")
        answer = {
            "id": f"chatcmpl-{request.headers.get('x-request-id')}",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        return Response(orjson.dumps(answer), 200, media_type="application/json")


@contextlib.contextmanager
def fault_proxy(
    target: str | None = None,
    *,
    models: list[str] | None = None,
    port: int | None = None,
    **options: Any,
) -> Iterator[FaultProxy]:
    """Serve a ``FaultProxy`` on 127.0.0.1 (in a thread) until the block ends."""
    proxy = FaultProxy(port or free_port(), target, models or [], **options)
    routes = [Route("/{path:path}", proxy.handle, methods=["GET", "POST"])]
    with serving(Starlette(routes=routes), proxy.port):
        yield proxy


@contextlib.contextmanager
def serving(app: Any, port: int) -> Iterator[None]:
    """Run ``app`` with uvicorn on 127.0.0.1:``port`` in a daemon thread."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the fault proxy did not start on port {port}")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)
