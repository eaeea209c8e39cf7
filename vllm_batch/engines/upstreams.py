"""The remote engine's upstreams: OpenAI-compatible servers, their health and concurrency.

Each ``Upstream`` is one base URL (``http://host:8000/v1``) with the models its
``/v1/models`` lists, a count of requests in flight and an ``Aimd`` window that caps them::

    healthy ──connection lost, or 3 failures in a row (5xx, timeout)──▶ down
    down ──a probe of /v1/models answers (every engine_health_interval s)──▶ healthy
    healthy ──429 (or 503 with Retry-After)──▶ paused until Retry-After, window halved

``UpstreamPool.acquire`` hands out a slot on the least loaded healthy upstream that serves
the model and waits (up to a deadline) while there is none: a dead upstream is failed
over, and taken back once a probe finds it healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from vllm_batch.config import ModelSpec

log = logging.getLogger(__name__)

FAILURES_BEFORE_DOWN = 3
"""Failures in a row (5xx, timeouts, bad bodies) that take an upstream out of rotation."""
MODELS_REFRESH_SECONDS = 30.0
"""Healthy upstreams' model lists are re-read this often (a failing read: down)."""
PROBE_TIMEOUT_SECONDS = 5.0
MAX_PROBE_SECONDS = 30.0
MAX_RETRY_AFTER_SECONDS = 300.0
DEFAULT_RETRY_AFTER_SECONDS = 1.0
INITIAL_WINDOW = 4
"""A new window starts this small and doubles per round trip up to the cap (slow start)."""
LATENCY_SMOOTHING = 0.2
"""Weight of the newest request in the latency average."""
BASELINE_SECONDS = 300.0
BASELINE_BUCKET_SECONDS = 30.0


class UpstreamsUnreachable(Exception):
    """No upstream answered ``/models``: which models they serve is unknown for now."""


class NoUpstream(Exception):
    """No healthy upstream serving the model had a free slot before the deadline."""


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) in seconds, within 0 to 300."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


class Aimd:
    """Additive-increase, multiplicative-decrease on an upstream's in-flight window.

    The window starts at ``INITIAL_WINDOW`` and doubles per round trip (one more slot per
    success) until the first congestion signal or ``cap``, then grows by one slot per
    window of successes. It halves (not below ``floor``) on a 429, or when the average
    latency per output token exceeds ``latency_factor`` times its lowest value over the last
    five minutes (0: latency is ignored). Only requests sent after the last halving can
    halve it again, so one burst of slow answers counts once.
    """

    def __init__(
        self,
        cap: int,
        floor: int = 1,
        latency_factor: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = cap
        self.floor = min(floor, cap)
        self.latency_factor = latency_factor
        self.window = float(min(cap, max(self.floor, INITIAL_WINDOW)))
        self.threshold = float(cap)
        """Slow start ends here (the window after the last halving)."""
        self.average: float | None = None
        self.decreases = 0
        self._clock = clock
        self._last_decrease = -math.inf
        self._minima: deque[tuple[float, float]] = deque()

    @property
    def limit(self) -> int:
        """Requests that may be in flight now."""
        return max(self.floor, int(self.window))

    def baseline(self) -> float | None:
        """The lowest average latency per output token over the last five minutes."""
        return min((low for _, low in self._minima), default=None)

    def on_success(self, seconds: float, output_tokens: int, sent_at: float) -> None:
        """A request sent at ``sent_at`` answered after ``seconds`` with ``output_tokens``."""
        per_token = seconds / (1 + max(0, output_tokens))
        self.average = (
            per_token
            if self.average is None
            else (1 - LATENCY_SMOOTHING) * self.average + LATENCY_SMOOTHING * per_token
        )
        baseline = self.baseline()
        self._remember(self.average)
        if (
            self.latency_factor > 0
            and baseline is not None
            and self.average > self.latency_factor * baseline
        ):
            self.on_congestion(sent_at)
            return
        if self.window < self.threshold:
            self.window = min(self.cap, self.threshold, self.window + 1)
        else:
            self.window = min(float(self.cap), self.window + 1 / self.window)

    def on_congestion(self, sent_at: float) -> bool:
        """A 429 or a slow answer for a request sent at ``sent_at``: halve the window once
        per round trip. Whether it halved."""
        if sent_at < self._last_decrease:
            return False
        self.window = max(float(self.floor), self.window / 2)
        self.threshold = self.window
        self._last_decrease = self._clock()
        self.average = None  # judge the halved window by fresh answers only
        self.decreases += 1
        return True

    def _remember(self, value: float) -> None:
        now = self._clock()
        bucket = now - now % BASELINE_BUCKET_SECONDS
        if self._minima and self._minima[-1][0] == bucket:
            self._minima[-1] = (bucket, min(self._minima[-1][1], value))
        else:
            self._minima.append((bucket, value))
        while self._minima and self._minima[0][0] < now - BASELINE_SECONDS:
            self._minima.popleft()


@dataclass
class Upstream:
    """One OpenAI-compatible server and what this process knows about it."""

    url: str
    aimd: Aimd
    models: set[str] = field(default_factory=set)
    healthy: bool = False
    in_flight: int = 0
    failures: int = 0
    """Failures in a row since the last answer."""
    paused_until: float = 0.0
    last_error: str | None = None
    checked_at: float = -math.inf
    trips: int = 0
    """Times taken out of rotation since its last success."""
    probe_at: float = -math.inf
    """A down upstream is probed from then on."""

    def available(self, now: float) -> bool:
        return self.healthy and self.paused_until <= now and self.in_flight < self.aimd.limit

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "models": sorted(self.models),
            "in_flight": self.in_flight,
            "window": self.aimd.limit,
            "decreases": self.aimd.decreases,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class PoolLimits:
    """Per-upstream concurrency and AIMD knobs (from the ``engine_*`` settings)."""

    max_concurrency: int = 64
    min_concurrency: int = 1
    latency_factor: float = 3.0
    health_interval: float = 2.0


class UpstreamPool:
    """The upstreams one remote engine sends its model's requests to."""

    def __init__(
        self,
        urls: Iterable[str],
        model: str,
        client: httpx.AsyncClient,
        limits: PoolLimits = PoolLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.client = client
        self.limits = limits
        self._clock = clock
        self.upstreams = [
            Upstream(
                url,
                Aimd(
                    limits.max_concurrency,
                    limits.min_concurrency,
                    limits.latency_factor,
                    clock=clock,
                ),
            )
            for url in urls
        ]
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._prober: asyncio.Task[None] | None = None

    def serving(self) -> list[Upstream]:
        """Upstreams whose last model list named the model (healthy or not)."""
        return [u for u in self.upstreams if self.model in u.models]

    async def start(self) -> None:
        """Read every upstream's models now, then keep probing in the background."""
        await asyncio.gather(*(self.probe(u) for u in self.upstreams))
        self._prober = asyncio.create_task(self._probe_loop(), name="upstream probes")

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        self._wake(None)

    def why_unavailable(self) -> str:
        """Each upstream's state, for an error message."""
        parts = []
        for u in self.upstreams:
            if not u.healthy:
                parts.append(f"{u.url} is down ({u.last_error or 'not checked yet'})")
            elif self.model not in u.models:
                listed = ", ".join(sorted(u.models)) or "nothing"
                parts.append(f"{u.url} does not serve it (its /models lists {listed})")
            else:
                parts.append(f"{u.url} is busy ({u.in_flight} in flight, window {u.aimd.limit})")
        return "; ".join(parts)

    async def acquire(self, deadline: float, avoid: Upstream | None = None) -> Upstream:
        """A slot on the least loaded available upstream (``avoid`` only if it is the only
        one); waits for one until ``deadline`` (monotonic), then raises ``NoUpstream``."""
        loop = asyncio.get_running_loop()
        while True:
            now = self._clock()
            chosen = self._pick(now, avoid)
            if chosen is not None:
                chosen.in_flight += 1
                return chosen
            if now >= deadline:
                raise NoUpstream(self.why_unavailable())
            pauses = [u.paused_until for u in self.upstreams if u.paused_until > now]
            timeout = min([deadline - now, 1.0, *(p - now for p in pauses)])
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait({waiter}, timeout=max(0.0, timeout))
            finally:
                waiter.cancel()  # skipped by ``_wake`` from now on

    def _pick(self, now: float, avoid: Upstream | None) -> Upstream | None:
        """Upstreams whose last attempt failed go last; then the least loaded."""
        ready = [u for u in self.upstreams if self.model in u.models and u.available(now)]
        if len(ready) > 1 and avoid in ready:
            ready.remove(avoid)
        return min(ready, key=lambda u: (u.failures, u.in_flight / u.aimd.limit), default=None)

    def release(self, upstream: Upstream) -> None:
        """The slot taken by ``acquire`` is free again."""
        upstream.in_flight -= 1
        self._wake(1)

    def _wake(self, count: int | None) -> None:
        """Wake ``count`` waiting ``acquire`` calls (None: all of them)."""
        while self._waiters and (count is None or count > 0):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if count is not None:
                    count -= 1

    # ---- outcomes of requests

    def succeeded(
        self, upstream: Upstream, seconds: float, output_tokens: int, sent: float
    ) -> None:
        upstream.failures = upstream.trips = 0
        before = upstream.aimd.limit
        upstream.aimd.on_success(seconds, output_tokens, sent)
        if upstream.aimd.limit > before:  # the window grew: as many more may go now
            self._wake(upstream.aimd.limit - before)

    def answered(self, upstream: Upstream) -> None:
        """The upstream answered (a 4xx the request caused): it is alive."""
        upstream.failures = 0

    def throttled(self, upstream: Upstream, retry_after: float | None, sent: float) -> None:
        """A 429: no new requests to it until ``Retry-After``, and its window halves."""
        wait = DEFAULT_RETRY_AFTER_SECONDS if retry_after is None else retry_after
        upstream.paused_until = max(upstream.paused_until, self._clock() + wait)
        if upstream.aimd.on_congestion(sent):
            log.info(
                "upstream %s answered 429: window %d, paused %.1f s",
                upstream.url,
                upstream.aimd.limit,
                wait,
            )

    def failed(
        self,
        upstream: Upstream,
        error: str,
        *,
        fatal: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """A failed attempt: ``fatal`` (the connection broke) takes the upstream out at once,
        else after ``FAILURES_BEFORE_DOWN`` in a row. ``retry_after`` pauses it."""
        upstream.failures += 1
        upstream.last_error = error
        if retry_after is not None:
            upstream.paused_until = max(upstream.paused_until, self._clock() + retry_after)
        if upstream.healthy and (fatal or upstream.failures >= FAILURES_BEFORE_DOWN):
            self._mark_down(upstream, error)

    def _mark_down(self, upstream: Upstream, error: str) -> None:
        """Out of rotation until a probe answers; one that fails again right after being
        taken back waits twice as long for its next probe (up to ``MAX_PROBE_SECONDS``)."""
        upstream.healthy = False
        upstream.trips += 1
        backoff = self.limits.health_interval * 2 ** (upstream.trips - 1)
        upstream.probe_at = self._clock() + min(MAX_PROBE_SECONDS, backoff)
        others = [u.url for u in self.serving() if u.healthy]
        log.warning(
            "upstream %s is down (%s); %s",
            upstream.url,
            error,
            f"failing over to {', '.join(others)}" if others else "waiting for an upstream",
        )
        self._wake(None)

    # ---- health probes

    async def probe(self, upstream: Upstream) -> bool:
        """Read ``/models``; healthy (and its model list updated) if it answers."""
        upstream.checked_at = self._clock()
        try:
            response = await self.client.get(
                f"{upstream.url}/models", timeout=PROBE_TIMEOUT_SECONDS
            )
            response.raise_for_status()
            models = model_ids(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            error = f"/models: {describe_http_error(exc)}"
            if upstream.healthy:
                self.failed(upstream, error, fatal=True)
            upstream.last_error = error
            return False
        upstream.models = models
        if not upstream.healthy:
            upstream.healthy = True
            upstream.failures = 0
            upstream.paused_until = 0.0
            log.info("upstream %s is up (models: %s)", upstream.url, ", ".join(sorted(models)))
            self._wake(None)
        return True

    async def _probe_loop(self) -> None:
        interval = self.limits.health_interval
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            due = [
                u
                for u in self.upstreams
                if (not u.healthy and now >= u.probe_at)
                or (u.healthy and now - u.checked_at >= MODELS_REFRESH_SECONDS)
            ]
            with contextlib.suppress(Exception):
                await asyncio.gather(*(self.probe(u) for u in due))


def model_ids(listing: Any) -> set[str]:
    """The ``id`` of each model in an OpenAI ``/v1/models`` answer."""
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise ValueError("not a model list")
    return {str(m["id"]) for m in listing["data"] if isinstance(m, dict) and "id" in m}


def describe_http_error(exc: BaseException) -> str:
    """A short reason for a failed HTTP call (no URL: callers name the upstream)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def list_models(
    urls: Iterable[str], api_key: str | None, timeout: float = PROBE_TIMEOUT_SECONDS
) -> dict[str, set[str] | str]:
    """Each upstream's models, or why it could not be read (concurrently)."""
    urls = list(urls)
    async with httpx.AsyncClient(headers=auth_headers(api_key), timeout=timeout) as client:

        async def one(url: str) -> set[str] | str:
            try:
                response = await client.get(f"{url}/models")
                response.raise_for_status()
                return model_ids(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                return describe_http_error(exc)

        found = await asyncio.gather(*(one(url) for url in urls))
    return dict(zip(urls, found, strict=True))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def upstream_served(
    specs: Sequence[ModelSpec], urls: Sequence[str], api_key: str | None
) -> list[str]:
    """The names of ``specs`` whose model (``spec.path``) some upstream lists now.

    Raises ``UpstreamsUnreachable`` when no upstream answers (nothing can be judged)."""
    listings = await list_models(urls, api_key)
    found = [models for models in listings.values() if isinstance(models, set)]
    if not found:
        raise UpstreamsUnreachable("; ".join(f"{url}: {why}" for url, why in listings.items()))
    available = set().union(*found)
    return [spec.name for spec in specs if spec.path in available]


def discover_models(urls: Sequence[str], api_key: str | None) -> list[str]:
    """Every model the upstreams list now, sorted (blocking; for start-up)."""
    listings = asyncio.run(list_models(urls, api_key))
    found = [models for models in listings.values() if isinstance(models, set)]
    if not found:
        raise UpstreamsUnreachable("; ".join(f"{url}: {why}" for url, why in listings.items()))
    return sorted(set().union(*found))
