"""Slow and greedy clients, bounded at the connection: read timeouts and a per-client cap.

uvicorn has neither a request-header timeout nor a per-address connection limit, so a
client trickling header bytes holds its socket for as long as it likes. ``GuardedProtocol``
is uvicorn's httptools protocol with a watchdog per connection:

- ``headers``: from the connection's start (or a keep-alive request's first byte) until the
  request's headers are complete, at most ``VLLM_BATCH_HEADER_TIMEOUT`` seconds; else the
  client gets a 408 and the connection is closed.
- ``body``: the request body must advance by ``MIN_BODY_PROGRESS`` bytes (or end) every
  ``VLLM_BATCH_BODY_TIMEOUT`` seconds, so a stalled body and a byte-by-byte trickle are
  both cut off. Not counted while the server itself is not reading (the app has not asked
  for more body yet, or a ``100-continue`` is not yet sent). Else the connection is closed
  (a 408 first if no response has started) and the app sees a disconnect.
- a client address with ``VLLM_BATCH_MAX_CONNECTIONS_PER_CLIENT`` connections open gets a
  429 on any further one, as soon as its request headers are in, and that one is closed.

``server_config`` builds the ``uvicorn.Config`` with it: ``serve`` and the tests use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vllm_batch.config import Settings
from vllm_batch.observability import metrics

log = logging.getLogger(__name__)
MIN_BODY_PROGRESS = 1024
"""Bytes of request body that count as progress for the body timeout."""


class Phase(StrEnum):
    """What a connection's watchdog waits for."""

    HEADERS = "headers"
    BODY = "body"


class Refusal(StrEnum):
    """Why the guard ended a connection (the metric's ``reason`` label)."""

    HEADER_TIMEOUT = "header_timeout"
    BODY_TIMEOUT = "body_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    max_per_client: int
    """0: no cap."""

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_per_client=settings.max_connections_per_client,
        )


def _error_json(message: str, code: str) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def _raw_response(status: bytes, body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
    )
    return head + body


def too_many_connections(limit: int) -> Callable[..., Any]:
    """The ASGI app that answers a connection over the per-client cap: 429, then close."""
    body = _error_json(
        f"Too many connections from your address: at most {limit} may be open at once "
        "(VLLM_BATCH_MAX_CONNECTIONS_PER_CLIENT). Close some, or reuse them.",
        "too_many_connections",
    )

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


class _FlowControl(FlowControl):
    """uvicorn's flow control, telling the watchdog when reading resumes."""

    def __init__(self, transport: asyncio.Transport, on_resume: Callable[[], None]) -> None:
        super().__init__(transport)
        self._on_resume = on_resume

    def resume_reading(self) -> None:
        was_paused = self.read_paused
        super().resume_reading()
        if was_paused:
            self._on_resume()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header/body read timeouts and a per-client cap.

    ``guarded_protocol`` makes a subclass per server with its limits and its own counts.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits(10.0, 30.0, 0)
    open_by_client: ClassVar[Counter[str]] = Counter()
    """Open connections by client address, shared by the server's connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase | None = None
        self._since = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._peer: str | None = None
        self._progress = 0
        """Body bytes since the body clock last started."""

    # -- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _FlowControl(transport, self._resumed)
        self._peer = self.client[0] if self.client else None
        if self._peer is not None:
            self.open_by_client[self._peer] += 1
            cap = self.limits.max_per_client
            if cap and self.open_by_client[self._peer] > cap:
                self.app = too_many_connections(cap)
                metrics.connection_refused(Refusal.TOO_MANY_CONNECTIONS)
                log.debug("connection from %s over the cap of %d: 429", self._peer, cap)
        self._enter(Phase.HEADERS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        if self._peer is not None:
            self.open_by_client[self._peer] -= 1
            if self.open_by_client[self._peer] <= 0:
                del self.open_by_client[self._peer]
            self._peer = None
        super().connection_lost(exc)

    # -- parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase is None:  # a keep-alive connection's next request
            self._enter(Phase.HEADERS)

    def on_headers_complete(self) -> None:
        self._enter(Phase.BODY)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._progress += len(body)
        if self._progress >= MIN_BODY_PROGRESS:
            self._since, self._progress = time.monotonic(), 0

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._leave()

    # -- the watchdog
    def _limit(self) -> float:
        if self._phase is Phase.HEADERS:
            return self.limits.header_timeout
        return self.limits.body_timeout

    def _enter(self, phase: Phase) -> None:
        self._phase, self._since, self._progress = phase, time.monotonic(), 0
        self._arm(self._limit())

    def _leave(self) -> None:
        self._phase = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _arm(self, delay: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self.loop.call_later(delay, self._check)

    def _resumed(self) -> None:
        """The server reads again: the client's clock starts afresh."""
        if self._phase is not None:
            self._enter(self._phase)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase is Phase.HEADERS:  # a pipelined request: its clock starts now
            self._enter(Phase.HEADERS)

    def _waiting_on_us(self) -> bool:
        """Whether the server, not the client, is what the request waits for."""
        if self.flow is not None and self.flow.read_paused:
            return True
        cycle = self.cycle
        if cycle is None:
            return False
        if self._phase is Phase.HEADERS:  # the previous (pipelined) answer is still going
            return not cycle.response_complete
        return cycle.waiting_for_100_continue

    def _check(self) -> None:
        self._watchdog = None
        if self._phase is None or self.transport is None or self.transport.is_closing():
            return
        now = time.monotonic()
        if self._waiting_on_us():
            self._since, self._progress = now, 0
        left = self._since + self._limit() - now
        if left > 0:
            self._arm(left)
            return
        self._timed_out(self._phase)

    def _timed_out(self, phase: Phase) -> None:
        cycle = self.cycle if phase is Phase.BODY else None
        reason = Refusal.HEADER_TIMEOUT if phase is Phase.HEADERS else Refusal.BODY_TIMEOUT
        metrics.connection_refused(reason)
        log.debug("connection from %s: no complete request %s in time", self._peer, phase)
        self._leave()
        if cycle is not None:
            cycle.disconnected = True  # the app's receive() sees a disconnect, send() is a no-op
            cycle.message_event.set()
        if cycle is None or not cycle.response_started:
            if phase is Phase.HEADERS:
                message = (
                    "The request headers did not arrive in time "
                    f"({self.limits.header_timeout:g} s; VLLM_BATCH_HEADER_TIMEOUT)."
                )
            else:
                message = (
                    f"The request body did not advance by {MIN_BODY_PROGRESS} bytes within "
                    f"{self.limits.body_timeout:g} s (VLLM_BATCH_BODY_TIMEOUT)."
                )
            body = _error_json(message, "request_timeout")
            self.transport.write(_raw_response(b"408 Request Timeout", body))
        self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A ``GuardedProtocol`` subclass with ``limits`` and its own per-client counts."""

    class ServerProtocol(GuardedProtocol):
        pass

    ServerProtocol.limits = limits
    ServerProtocol.open_by_client = Counter()
    return ServerProtocol


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """``uvicorn.Config(app, **options)`` serving HTTP through the connection guard."""
    limits = ConnectionLimits.from_settings(settings)
    return uvicorn.Config(app, http=guarded_protocol(limits), **options)
