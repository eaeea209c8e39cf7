"""The remote engine (``--engine openai``): lines go to OpenAI-compatible upstream servers.

The upstreams (vLLM, SGLang, TGI, a llama.cpp server, a router in front of them) are
``--engine-url`` base URLs; each request goes to the least loaded healthy upstream that
lists the model, over one keep-alive connection pool (``engines/upstreams.py``).

- The body sent is the line's body with ``model`` as the upstream knows it (``--model
  NAME=UPSTREAM_MODEL``; plain ``NAME``: the same name). A 200 answer's body is the line's
  response body, as the upstream wrote it; its ``usage`` is counted as for the local engine.
- A 4xx the request caused (400, 404, 413, 422, ...) is the line's error, with the
  upstream's message, type and param, exactly as the local engine reports vLLM's errors.
- Connection errors, timeouts, 408, 429, 5xx and 401/403 (a wrong ``--engine-api-key``)
  never become error lines: the request is retried with backoff and jitter on another
  upstream (``retry.py``), waiting for one to come back if all are down. Only when no
  upstream served it for ``engine_retry_seconds`` does ``run`` raise ``EngineFailure``, so
  the worker hands the chunk back exactly as when a local engine dies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from vllm_batch.config import ModelSpec, Settings
from vllm_batch.engines.engine import EngineFailure, EngineResult
from vllm_batch.engines.serving import error_result, streaming_refused
from vllm_batch.engines.upstreams import (
    NoUpstream,
    PoolLimits,
    Upstream,
    UpstreamPool,
    auth_headers,
    describe_http_error,
    retry_after_seconds,
)
from vllm_batch.retry import retrying

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_SECONDS = 5.0
RETRY_FIRST_WAIT = 0.25
RETRY_MAX_WAIT = 5.0
RETRYABLE_CLIENT_ERRORS = frozenset({408, 429})
UPSTREAM_AUTH_ERRORS = frozenset({401, 403})


class EngineLoadFailed(Exception):
    """No upstream serves the model (or none answers): the engine cannot start."""


class UpstreamTrouble(Exception):
    """One attempt failed for a reason of the upstream's, not the request's: retry."""


@dataclass
class _Attempts:
    last: Upstream | None = None


class RemoteEngine:
    """Serves one model through the upstreams; ``run`` never raises for a bad request."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model_name = spec.name
        self.upstream_model = spec.path
        """The name the upstreams know the model by (``--model NAME=UPSTREAM_MODEL``)."""
        self._settings = settings
        self._transport = transport
        self._pool: UpstreamPool | None = None

    @property
    def pool(self) -> UpstreamPool | None:
        return self._pool

    @property
    def max_in_flight(self) -> int:
        """Every serving upstream's concurrency cap: the worker keeps that many lines
        submitted; the upstreams' AIMD windows decide how many are sent at once."""
        serving = len(self._pool.serving()) if self._pool is not None else 0
        count = serving or len(self._settings.engine_urls)
        return count * self._settings.engine_max_concurrency

    async def start(self) -> None:
        """Read the upstreams' model lists; fail unless one of them serves the model."""
        s = self._settings
        limits = PoolLimits(
            max_concurrency=s.engine_max_concurrency,
            min_concurrency=s.engine_min_concurrency,
            latency_factor=s.engine_latency_factor,
            health_interval=s.engine_health_interval,
        )
        connections = len(s.engine_urls) * s.engine_max_concurrency + len(s.engine_urls)
        client = httpx.AsyncClient(
            headers=auth_headers(s.engine_api_key),
            timeout=httpx.Timeout(s.engine_request_timeout, connect=CONNECT_TIMEOUT_SECONDS),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            transport=self._transport,
        )
        pool = UpstreamPool(s.engine_urls, self.upstream_model, client, limits)
        try:
            await pool.start()
            if not pool.serving():
                raise EngineLoadFailed(
                    f"no upstream serves the model {self.upstream_model!r}: "
                    f"{pool.why_unavailable()}"
                )
        except BaseException:
            await pool.close()
            await client.aclose()
            raise
        self._pool = pool
        names = ", ".join(u.url for u in pool.serving())
        log.info("remote engine for %s ready: %s", self.model_name, names)

    def upstream_states(self) -> list[dict[str, Any]]:
        """Each upstream's health, models, requests in flight and window (for ``/ready``)."""
        return [u.describe() for u in self._pool.upstreams] if self._pool is not None else []

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
            await pool.client.aclose()

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> EngineResult:
        pool = self._pool
        if pool is None:
            raise EngineFailure("the remote engine is not started")
        if body.get("stream"):
            return streaming_refused()
        payload = orjson.dumps({**body, "model": self.upstream_model})
        path = url.removeprefix("/v1")
        limit = self._settings.engine_retry_seconds
        deadline = time.monotonic() + limit
        attempts = _Attempts()
        policy = retrying(
            on=UpstreamTrouble,
            attempts=None,
            deadline=limit,
            first_wait=RETRY_FIRST_WAIT,
            max_wait=RETRY_MAX_WAIT,
            log=log,
            level=logging.DEBUG,  # upstream state changes are logged once, in the pool
            what=f"request {request_id}",
        )
        try:
            async for attempt in policy:
                with attempt:
                    return await self._attempt(pool, path, payload, request_id, deadline, attempts)
        except UpstreamTrouble as exc:
            raise EngineFailure(
                f"no upstream answered a request for {self.model_name} within {limit:.0f} s: {exc}"
            ) from exc
        raise AssertionError("unreachable: the retrier returns or raises")

    async def _attempt(
        self,
        pool: UpstreamPool,
        path: str,
        payload: bytes,
        request_id: str,
        deadline: float,
        attempts: _Attempts,
    ) -> EngineResult:
        try:
            upstream = await pool.acquire(deadline, avoid=attempts.last)
        except NoUpstream as exc:
            raise UpstreamTrouble(str(exc)) from exc
        attempts.last = upstream
        sent = time.monotonic()
        try:
            response = await pool.client.post(
                f"{upstream.url}{path}",
                content=payload,
                headers={"Content-Type": "application/json", "X-Request-Id": request_id},
            )
        except httpx.TimeoutException as exc:
            pool.failed(upstream, describe_http_error(exc))
            raise UpstreamTrouble(f"{upstream.url}: {describe_http_error(exc)}") from exc
        except httpx.TransportError as exc:  # refused, reset, closed mid-answer
            pool.failed(upstream, describe_http_error(exc), fatal=True)
            raise UpstreamTrouble(f"{upstream.url}: {describe_http_error(exc)}") from exc
        finally:
            pool.release(upstream)
        return self._outcome(pool, upstream, response, sent)

    def _outcome(
        self, pool: UpstreamPool, upstream: Upstream, response: httpx.Response, sent: float
    ) -> EngineResult:
        """The line's result, or ``UpstreamTrouble`` (with the pool told) to retry."""
        status = response.status_code
        where = f"{upstream.url}: HTTP {status}"
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if status == 429:
            pool.throttled(upstream, retry_after, sent)
            raise UpstreamTrouble(where)
        if status >= 500 or status in RETRYABLE_CLIENT_ERRORS:
            pool.failed(upstream, f"HTTP {status}", retry_after=retry_after)
            raise UpstreamTrouble(where)
        if status in UPSTREAM_AUTH_ERRORS:
            pool.failed(upstream, f"HTTP {status}: check --engine-api-key", fatal=True)
            raise UpstreamTrouble(f"{where} (the upstream refused our API key)")
        try:
            parsed = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            pool.failed(upstream, f"HTTP {status} without a JSON object")
            raise UpstreamTrouble(f"{where}: the body is not a JSON object")
        if status >= 300:
            pool.answered(upstream)
            return upstream_error(status, parsed)
        seconds = time.monotonic() - sent
        result = ok_body_result(response.content, parsed)
        pool.succeeded(upstream, seconds, result.output_tokens, sent)
        return result


def ok_body_result(content: bytes, parsed: dict[str, Any]) -> EngineResult:
    """A 200 result whose body is the upstream's bytes (one line), with its token counts."""
    text = content.decode().strip()
    if "\n" in text or "\r" in text:  # pretty-printed: an output line must be one line
        text = orjson.dumps(parsed).decode()
    counts = usage_counts(parsed.get("usage"))
    return EngineResult(
        status_code=200,
        body_json=text,
        input_tokens=counts.get("input_tokens", 0),
        cached_tokens=counts.get("cached_tokens", 0),
        output_tokens=counts.get("output_tokens", 0),
        reasoning_tokens=counts.get("reasoning_tokens", 0),
    )


def usage_counts(usage: Any) -> dict[str, int]:
    """``EngineResult`` token fields from a chat/completion/embedding or Responses ``usage``."""
    if not isinstance(usage, dict):
        return {}

    def number(value: Any) -> int:
        return value if isinstance(value, int) and value >= 0 else 0

    def detail(key: str, name: str) -> int:
        details = usage.get(key)
        return number(details.get(name)) if isinstance(details, dict) else 0

    if "input_tokens" in usage:  # the Responses API's names
        return {
            "input_tokens": number(usage.get("input_tokens")),
            "cached_tokens": detail("input_tokens_details", "cached_tokens"),
            "output_tokens": number(usage.get("output_tokens")),
            "reasoning_tokens": detail("output_tokens_details", "reasoning_tokens"),
        }
    return {
        "input_tokens": number(usage.get("prompt_tokens")),
        "cached_tokens": detail("prompt_tokens_details", "cached_tokens"),
        "output_tokens": number(usage.get("completion_tokens")),
        "reasoning_tokens": detail("completion_tokens_details", "reasoning_tokens"),
    }


def upstream_error(status: int, parsed: dict[str, Any]) -> EngineResult:
    """The line's error from an upstream's 4xx body (OpenAI's or vLLM's error shape)."""
    info = parsed.get("error")
    if not isinstance(info, dict):  # e.g. TGI's {"error": "...", "error_type": "..."}
        message = info if isinstance(info, str) else parsed.get("message") or parsed.get("detail")
        err_type = parsed.get("error_type") or parsed.get("type") or "BadRequestError"
        return error_result(status, str(err_type), str(message or f"HTTP {status}"), None)
    param = info.get("param")
    return error_result(
        status,
        str(info.get("type") or "BadRequestError"),
        str(info.get("message") or f"HTTP {status}"),
        param if isinstance(param, str) else None,
    )
