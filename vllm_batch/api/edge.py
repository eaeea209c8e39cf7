"""The HTTP edge: pure ASGI middleware that decides before any request body is read.

Outermost first (``install_edge`` adds them in reverse):

    RequestIdMiddleware  X-Request-Id on every response, refusals included; the id is
                         bound to every log line of the request; one access log line
    HostGuardMiddleware  DNS-rebinding guard, only when no API key is set   -> 400
    CORSMiddleware       (if configured) preflights are answered without a key
    EdgeGuardMiddleware  API key -> Principal in scope["state"] on /v1       -> 401
                         NUL in the path or query string                     -> 400
                         byte cap counted on what is actually received       -> 413
                         (uploads: max_upload_bytes; upload parts: max_upload_part_bytes)

An unauthenticated request never has its body read; a body over the cap is cut off as
it streams (chunked bodies too), and a Content-Length over the cap is refused at once.
Refusals that leave body bytes unread close the connection.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_batch.api.auth import KeyRing
from vllm_batch.api.errors import error_response
from vllm_batch.config import Settings
from vllm_batch.observability.logs import bound

log = logging.getLogger(__name__)
access_log = logging.getLogger("vllm_batch.access")
QUIET_PATHS = ("/health", "/ready", "/metrics")  # probes and scrapes: access log at DEBUG
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and form fields
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PART_PATH = re.compile(r"/v1/uploads/[^/]+/parts/?")


def install_edge(app: FastAPI, settings: Settings) -> None:
    """Add the edge middleware to ``app`` in the order drawn in the module docstring."""
    keys = KeyRing.from_settings(settings)
    app.state.keys = keys  # for the public routes that show more to a valid key
    app.add_middleware(EdgeGuardMiddleware, keys=keys, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=True,
        )
    if not keys.enabled:
        if settings.host in WILDCARD_BINDS and not settings.allowed_hosts:
            log.warning(
                "bound to %s without an API key: only Host headers %s are served; set "
                "VLLM_BATCH_ALLOWED_HOSTS (or an API key) to reach this server by other names",
                settings.host,
                ", ".join(sorted(allowed_hosts(settings))),
            )
        app.add_middleware(HostGuardMiddleware, allowed=allowed_hosts(settings))
    app.add_middleware(RequestIdMiddleware)


def allowed_hosts(settings: Settings) -> set[str]:
    """Host names accepted without an API key: loopback, the bind host and ``allowed_hosts``."""
    return {host.lower() for host in (*LOCAL_HOSTS, settings.host, *settings.allowed_hosts)}


def host_name(host_header: str) -> str:
    """``"[::1]:4080"`` → ``"::1"``, ``"Example.com:80"`` → ``"example.com"``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def may_have_body(scope: Scope) -> bool:
    """Whether the client announced body bytes (Content-Length > 0 or chunked)."""
    headers = Headers(scope=scope)
    length = headers.get("content-length", "")
    return "transfer-encoding" in headers or (length not in ("", "0"))


def has_nul(scope: Scope) -> bool:
    """Whether the path or query string carries a NUL (no database can store one)."""
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope["path"] or b"%00" in query or b"\x00" in query


async def refuse(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    close: bool = False,
) -> None:
    """Answer in OpenAI's error shape without touching the request body."""
    response = error_response(status, message, param, code)
    if close:
        response.headers["Connection"] = "close"

    async def no_body() -> Message:
        return {"type": "http.disconnect"}

    await response(scope, no_body, send)


class RequestIdMiddleware:
    """Echo a sane client ``X-Request-Id`` or make one; set it on every response.

    The id is bound to the request's log lines. The access line names method, path (never
    the query string, headers or body), status and duration.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        with bound(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log_access(scope, status, time.perf_counter() - started)


def log_access(scope: Scope, status: int, seconds: float) -> None:
    """One line per request: method, path, status, duration (no query string, no body)."""
    path: str = scope["path"][:200]
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if access_log.isEnabledFor(level):
        ms = round(seconds * 1000, 1)
        access_log.log(
            level,
            "%s %s %d %.1fms",
            scope["method"],
            path,
            status,
            ms,
            extra={"method": scope["method"], "path": path, "status": status, "duration_ms": ms},
        )


class HostGuardMiddleware:
    """Refuse Host headers outside ``allowed`` (``"*"`` allows all): DNS-rebinding guard."""

    def __init__(self, app: ASGIApp, *, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = set(allowed)
        self.allow_all = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allow_all:
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                await refuse(
                    scope,
                    send,
                    400,
                    f"Invalid Host header {host!r}. Without an API key only local hosts are "
                    "served; add this host to VLLM_BATCH_ALLOWED_HOSTS or set an API key.",
                    param="host",
                    code="invalid_host",
                    close=may_have_body(scope),
                )
                return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    """Raised from ``receive`` once more bytes arrived than the cap allows."""


class CappedReceive:
    """Wraps ``receive`` and counts body bytes as they actually arrive."""

    def __init__(self, receive: Receive, cap: int) -> None:
        self.receive = receive
        self.cap = cap
        self.received = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.cap:
                self.exceeded = True
                raise BodyTooLarge()
        return message


class EdgeGuardMiddleware:
    """API key check on ``/v1`` (before the body) and a byte cap on every request body."""

    def __init__(self, app: ASGIApp, *, keys: KeyRing, settings: Settings) -> None:
        self.app = app
        self.keys = keys
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_part_bytes = settings.max_upload_part_bytes
        self.body_cap = settings.max_request_body_bytes

    def is_upload(self, scope: Scope) -> bool:
        return bool(scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files")

    def is_part(self, scope: Scope) -> bool:
        """``POST /v1/uploads/{id}/parts``: one part of a chunked upload."""
        return bool(scope["method"] == "POST" and PART_PATH.fullmatch(scope["path"]))

    async def too_large(self, scope: Scope, send: Send, cap: int) -> None:
        if self.is_part(scope):
            await refuse(
                scope,
                send,
                413,
                f"Part is too large: the limit is {self.max_part_bytes} bytes per part.",
                param="data",
                code="part_too_large",
                close=True,
            )
        elif self.is_upload(scope):
            await refuse(
                scope,
                send,
                413,
                f"File is too large: the limit is {self.max_upload_bytes} bytes.",
                param="file",
                code="file_too_large",
                close=True,
            )
        else:
            await refuse(
                scope,
                send,
                413,
                f"Request body is too large: the limit is {cap} bytes.",
                code="request_too_large",
                close=True,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/v1" or path.startswith("/v1/"):
            authorization = Headers(scope=scope).get("authorization", "")
            principal = self.keys.resolve(authorization.encode("latin-1"))
            if principal is None:
                await refuse(
                    scope,
                    send,
                    401,
                    "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    close=may_have_body(scope),
                )
                return
            scope.setdefault("state", {})["principal"] = principal
        if has_nul(scope):
            await refuse(
                scope,
                send,
                400,
                "The URL may not contain NUL characters.",
                code="invalid_url",
                close=may_have_body(scope),
            )
            return
        cap = self.body_cap
        if self.is_upload(scope):
            cap = self.max_upload_bytes + UPLOAD_OVERHEAD_BYTES
        elif self.is_part(scope):
            cap = self.max_part_bytes + UPLOAD_OVERHEAD_BYTES
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > cap:
            await self.too_large(scope, send, cap)
            return
        capped = CappedReceive(receive, cap)
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if capped.exceeded:  # whatever the app answers, the answer is 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self.too_large(scope, send, cap)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, capped, guarded_send)
        except Exception:
            if started or not capped.exceeded:
                raise
            await self.too_large(scope, send, cap)
