"""Process-side Prometheus metrics: counters, histograms and live gauges, one call each.

Every process (the API server with its in-process worker, each ``vllm-batch worker``)
records into prometheus-client's multiprocess files in one directory per host
(``Settings.resolved_metrics_dir``), so one scrape sums all processes on the host:

- counters and histograms of dead processes keep counting (a restart never lowers a sum);
  the directory is wiped only when no other live process uses it (a fresh start);
- gauges are ``live*``: a dead process's values vanish (its files are removed at
  startup and at every scrape).

Nothing here touches the database; recording is a few mmap writes. Until ``configure``
ran (or with metrics off) every recording call is a no-op. The names are listed in
docs/observability.md (tests/integration/test_metrics_endpoint.py checks them).
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import glob
import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, Protocol

import psutil
from prometheus_client import Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from vllm_batch.config import Settings
from vllm_batch.observability.timeline import PHASES

log = logging.getLogger(__name__)

PREFIX = "vllm_batch_"
THROUGHPUT_WINDOW_SECONDS = 30.0
TICK_SECONDS = 5.0
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LOOP_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
REQUEUE_REASONS = ("engine_failure", "engine_unavailable", "stopped", "error", "incomplete")
TOKEN_KINDS = ("input", "cached", "output", "reasoning")
FINAL_STATUSES = ("completed", "cancelled", "expired")
DELIVERY_KINDS = ("webhook", "handler")
DELIVERY_OUTCOMES = ("succeeded", "retrying", "failed", "lease_lost")
CONNECTION_REFUSALS = ("header_timeout", "body_timeout", "too_many_connections")


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return Counter(PREFIX + name, doc, labels, registry=None)


def _gauge(
    name: str, doc: str, labels: Sequence[str], mode: Literal["livesum", "livemax"]
) -> Gauge:
    return Gauge(PREFIX + name, doc, labels, registry=None, multiprocess_mode=mode)


# Counters labelled by model alone, declared at 0 for every served model: name → help.
MODEL_COUNTERS = {
    "lines_completed": "Lines saved with a successful response.",
    "lines_failed": "Lines saved as errors.",
    "chunk_claims": "Chunks leased by a worker.",
    "chunk_lease_expiries": "Chunks taken over from an expired lease.",
    "chunks_done": "Chunks finished (every line saved).",
    "chunk_leases_lost": "Chunks lost to another worker mid-run.",
    "chunks_given_up": "Chunks whose lines became errors after engine failures.",
    "engine_loads": "Engine starts that succeeded.",
    "engine_restarts": "Engines dropped after an engine failure.",
    "engine_load_failures": "Engine starts that failed.",
    # vLLM's own scheduler stats (observability/engine_stats.py)
    "engine_prefix_cache_queries": "Prompt tokens looked up in the prefix cache.",
    "engine_prefix_cache_hits": "Prompt tokens found in the prefix cache.",
    "engine_preemptions": "Requests preempted by the engine's scheduler.",
}
# Live gauges labelled by model alone, declared at 0 for every served model.
MODEL_GAUGES: dict[str, tuple[str, Literal["livesum", "livemax"]]] = {
    "engine_loaded": ("Live processes with this model's engine loaded.", "livesum"),
    "engine_running_requests": ("Requests in the engine's running batch.", "livesum"),
    "engine_waiting_requests": ("Requests waiting in the engine's scheduler.", "livesum"),
    "engine_kv_cache_usage_ratio": ("KV-cache usage (0-1).", "livemax"),
    "engine_prefix_cache_hit_rate": (
        "Prefix-cache hit rate over the last 1000 requests (0-1).",
        "livemax",
    ),
}
ENGINE_GAUGES = (  # MODEL_GAUGES that follow the engine: zero once it stops
    "engine_loaded",
    "engine_running_requests",
    "engine_waiting_requests",
    "engine_kv_cache_usage_ratio",
)


class _Metrics:
    """Every process-side metric; built once, after the multiprocess directory is set."""

    def __init__(self) -> None:
        m = ("model",)
        self.counters = {name: _counter(name, doc, m) for name, doc in MODEL_COUNTERS.items()}
        self.gauges = {
            name: _gauge(name, doc, m, mode) for name, (doc, mode) in MODEL_GAUGES.items()
        }
        self.tokens = _counter(
            "tokens", "Tokens of saved lines (cached within input).", (*m, "kind")
        )
        self.latency = Histogram(
            PREFIX + "request_latency_seconds",
            "Per request: submitted to the engine until its result (5xx retries included).",
            m,
            registry=None,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_duration = Histogram(
            PREFIX + "batch_duration_seconds",
            "Batch time to complete: created until its final status.",
            (*m, "status"),
            registry=None,
            buckets=DURATION_BUCKETS,
        )
        self.batch_phases = Histogram(
            PREFIX + "batch_phase_seconds",
            "Per completed batch: seconds in each phase of its timeline "
            "(validation, queue, run, finalize; observability/timeline.py).",
            (*m, "phase"),
            registry=None,
            buckets=PHASE_BUCKETS,
        )
        self.lines_per_second = _gauge(
            "lines_per_second", "Lines finished per second (last 30 s).", m, "livesum"
        )
        self.tokens_per_second = _gauge(
            "tokens_per_second", "Tokens per second (last 30 s).", (*m, "kind"), "livesum"
        )
        self.requeues = _counter(
            "chunk_requeues", "Chunks handed back to the queue.", (*m, "reason")
        )
        self.db_retries = _counter("db_retries", "Database calls retried after an outage error.")
        self.storage_refusals = _counter(
            "storage_write_refusals", "Blob writes the file storage refused for lack of space."
        )
        self.finalize_retries = _counter(
            "finalize_storage_retries",
            "Batch finalizations put off because the file storage refused the output.",
        )
        kind = ("kind",)
        self.delivery_attempts = _counter(
            "delivery_attempts", "Delivery attempts by outcome.", (*kind, "outcome")
        )
        self.connections_refused = _counter(
            "http_connections_refused",
            "HTTP connections ended by the connection guard, by reason.",
            ("reason",),
        )
        self.delivery_breakers_opened = _counter(
            "delivery_breakers_opened",
            "Receiver circuit breakers opened after consecutive delivery failures.",
            kind,
        )
        self.delivery_seconds = Histogram(
            PREFIX + "delivery_attempt_seconds",
            "Duration of one delivery attempt.",
            kind,
            registry=None,
            buckets=ATTEMPT_BUCKETS,
        )
        self.loop_lag = Histogram(
            PREFIX + "event_loop_lag_seconds",
            "How late the server's event loop ran a timer (observability/loop_lag.py).",
            registry=None,
            buckets=LOOP_LAG_BUCKETS,
        )
        self.rates = _Rates(self)

    def declare_model(self, model: str) -> None:
        """Create the model's series at 0: rates and dashboards see every name from the start."""
        for metric in (*self.counters.values(), *self.gauges.values()):
            metric.labels(model)
        for kind in TOKEN_KINDS:
            self.tokens.labels(model, kind)
        for reason in REQUEUE_REASONS:
            self.requeues.labels(model, reason)
        for status in FINAL_STATUSES:
            self.batch_duration.labels(model, status)
        for phase in PHASES:
            self.batch_phases.labels(model, phase)
        self.latency.labels(model)
        self.rates.declare(model)

    def declare_deliveries(self) -> None:
        for kind in DELIVERY_KINDS:
            self.delivery_seconds.labels(kind)
            self.delivery_breakers_opened.labels(kind)
            for outcome in DELIVERY_OUTCOMES:
                self.delivery_attempts.labels(kind, outcome)
        for reason in CONNECTION_REFUSALS:  # not deliveries, but declared once as well
            self.connections_refused.labels(reason)


class _Rates:
    """Lines and tokens per second over a sliding window, set on live gauges."""

    def __init__(self, metrics: _Metrics) -> None:
        self._metrics = metrics
        self._events: dict[str, deque[tuple[float, int, int, int]]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._since = time.monotonic()

    def declare(self, model: str) -> None:
        with self._lock:
            self._events.setdefault(model, deque())
        self.refresh()

    def add(self, model: str, lines: int, input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self._events[model].append((time.monotonic(), lines, input_tokens, output_tokens))
        self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        window = max(1.0, min(THROUGHPUT_WINDOW_SECONDS, now - self._since))
        with self._lock:
            totals = {}
            for model, events in self._events.items():
                while events and events[0][0] < now - THROUGHPUT_WINDOW_SECONDS:
                    events.popleft()
                totals[model] = [sum(e[i] for e in events) / window for i in (1, 2, 3)]
        for model, (lines, input_tokens, output_tokens) in totals.items():
            self._metrics.lines_per_second.labels(model).set(lines)
            self._metrics.tokens_per_second.labels(model, "input").set(input_tokens)
            self._metrics.tokens_per_second.labels(model, "output").set(output_tokens)


_metrics: _Metrics | None = None
_directory: Path | None = None
_configure_lock = threading.Lock()


def configure(settings: Settings) -> Path | None:
    """Turn recording on for this process; returns the shared directory, or None if off.

    The directory is chosen once per process: later calls (other apps in the same process,
    as in tests) record into the same one and only declare their models' series.
    """
    global _metrics, _directory
    if not settings.metrics_enabled:
        return None
    with _configure_lock:
        if _metrics is None:
            directory = _choose_directory(settings)
            directory.mkdir(parents=True, exist_ok=True)
            clean_directory(directory)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
            if not getattr(values.ValueClass, "_multiprocess", False):
                # prometheus-client picks its value class at import; it was imported
                # before the directory was known (e.g. by vLLM): switch to files now.
                values.ValueClass = values.MultiProcessValue()
                _rebind_unlabelled()
            _directory = directory
            _metrics = _Metrics()
            _metrics.declare_deliveries()
            atexit.register(_process_exit)
            threading.Thread(target=_tick, name="metrics-rates", daemon=True).start()
            log.info("metrics: recording in %s", directory)
        for model in settings.served_model_names:
            _metrics.declare_model(model)
        return _directory


def _rebind_unlabelled() -> None:
    """Give our unlabelled metrics made before the switch (e.g. the GPU guard's) file values.

    A labelled child gets its value when ``labels()`` is first called, so it already uses
    the new class; an unlabelled metric made its value at construction. prometheus-client
    (pinned) re-creates it in ``_metric_init``.
    """
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        name = getattr(collector, "_name", "")
        if name.startswith("vllm_batch_") and not getattr(collector, "_labelnames", ()):
            collector._metric_init()  # type: ignore[attr-defined]


def _choose_directory(settings: Settings) -> Path:
    wanted = settings.resolved_metrics_dir.resolve()
    preset = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if preset and getattr(values.ValueClass, "_multiprocess", False):
        # Files were already opened there at import: ours must go to the same place.
        if Path(preset).resolve() != wanted:
            log.warning("metrics: using PROMETHEUS_MULTIPROC_DIR=%s (set before start)", preset)
        return Path(preset).resolve()
    return wanted


def directory() -> Path | None:
    """The directory this process records into, or None if metrics are off here."""
    return _directory


def enabled() -> bool:
    return _metrics is not None


def _tick() -> None:
    wait = threading.Event().wait  # not time.sleep: tests patch that in their own threads
    while True:
        wait(TICK_SECONDS)
        metrics = _metrics
        if metrics is not None:
            with contextlib.suppress(Exception):
                metrics.rates.refresh()


def _process_exit() -> None:
    """A clean exit: this process's live gauges stop counting at once."""
    if _directory is not None:
        with contextlib.suppress(Exception):
            mark_process_dead(os.getpid(), str(_directory))


# ------------------------------------------------------------------ directory upkeep


def _file_pids(directory: Path) -> dict[int, list[str]]:
    """The ``*.db`` files in ``directory`` by the pid in their name."""
    pids: dict[int, list[str]] = defaultdict(list)
    for path in glob.glob(os.path.join(directory, "*.db")):
        stem = os.path.basename(path)[: -len(".db")]
        with contextlib.suppress(ValueError):
            pids[int(stem.rsplit("_", 1)[1])].append(path)
    return pids


def reap_dead(directory: Path) -> list[int]:
    """Drop the live gauges of processes that are gone; returns their pids."""
    me = os.getpid()
    dead = [pid for pid in _file_pids(directory) if pid != me and not psutil.pid_exists(pid)]
    for pid in dead:
        mark_process_dead(pid, str(directory))
    return dead


def clean_directory(directory: Path) -> None:
    """At startup: wipe the directory if no other live process uses it, else reap the dead."""
    me = os.getpid()
    pids = _file_pids(directory)
    if any(pid != me and psutil.pid_exists(pid) for pid in pids):
        reap_dead(directory)
        return
    for pid, paths in pids.items():
        if pid != me:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


class ProcessCollector(Collector):
    """Our series from every process's files in ``directory`` (other libraries' are left out)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[object]:  # type: ignore[override]
        reap_dead(self.directory)
        files = glob.glob(os.path.join(self.directory, "*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):
            if metric.name.startswith(PREFIX):
                yield metric


# ------------------------------------------------------------------ recording calls


class SavedLine(Protocol):
    """What ``lines_saved`` reads of a finished line (``pipeline``'s ``LineResult``)."""

    @property
    def is_error(self) -> bool: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def reasoning_tokens(self) -> int: ...
    @property
    def seconds(self) -> float | None: ...


def lines_saved(model: str, results: Iterable[SavedLine]) -> None:
    """Lines just saved by a worker: counts, tokens, latency and throughput."""
    m = _metrics
    if m is None:
        return
    ok = failed = input_tokens = cached = output_tokens = reasoning = 0
    seconds = []
    for result in results:
        if result.is_error:
            failed += 1
        else:
            ok += 1
        input_tokens += result.input_tokens
        cached += result.cached_tokens
        output_tokens += result.output_tokens
        reasoning += result.reasoning_tokens
        if result.seconds is not None:
            seconds.append(result.seconds)
    observe_many(m.latency.labels(model), seconds)
    _count("lines_completed", model, ok)
    _count("lines_failed", model, failed)
    for kind, count in (
        ("input", input_tokens),
        ("cached", cached),
        ("output", output_tokens),
        ("reasoning", reasoning),
    ):
        if count:
            m.tokens.labels(model, kind).inc(count)
    if ok or failed:
        m.rates.add(model, ok + failed, input_tokens, output_tokens)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` for each amount, with one write per bucket (not per amount).

    In multiprocess mode every observation is a write to a shared file; a flush of a
    thousand lines would be thousands of them. Falls back to ``observe`` if the client's
    histogram internals (``_upper_bounds``, ``_buckets``, ``_sum``) ever change.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    if not amounts:
        return
    counts: defaultdict[int, int] = defaultdict(int)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount
    total.inc(sum(amounts))
    for index, count in counts.items():
        buckets[index].inc(count)


def lines_expired(model: str | None, count: int) -> None:
    """Unfinished lines written as errors when a batch expired."""
    if count > 0:
        _count("lines_failed", model or "", count)


def batch_finished(model: str | None, status: str, seconds: float) -> None:
    if _metrics is not None:
        _metrics.batch_duration.labels(model or "", status).observe(max(0.0, seconds))


def batch_phases(model: str | None, phases: Mapping[str, float]) -> None:
    """A completed batch's phases (``timeline.phases``), once per batch: by its finalizer."""
    if _metrics is not None:
        for phase, seconds in phases.items():
            _metrics.batch_phases.labels(model or "", phase).observe(max(0.0, seconds))


def _count(name: str, model: str, amount: int = 1) -> None:
    """Add ``amount`` (if any) to the model's series of the ``MODEL_COUNTERS`` entry ``name``."""
    if _metrics is not None and amount:
        _metrics.counters[name].labels(model).inc(amount)


def _set(name: str, model: str, value: float) -> None:
    """Set the model's series of the ``MODEL_GAUGES`` entry ``name``."""
    if _metrics is not None:
        _metrics.gauges[name].labels(model).set(value)


def chunk_claimed(model: str, *, lease_expired: bool) -> None:
    _count("chunk_claims", model)
    if lease_expired:
        _count("chunk_lease_expiries", model)


def chunk_done(model: str) -> None:
    _count("chunks_done", model)


def chunk_requeued(model: str, reason: str) -> None:
    if _metrics is not None:
        _metrics.requeues.labels(model, reason).inc()


def chunk_lease_lost(model: str) -> None:
    _count("chunk_leases_lost", model)


def chunk_given_up(model: str) -> None:
    _count("chunks_given_up", model)


def db_retry() -> None:
    if _metrics is not None:
        _metrics.db_retries.inc()


def storage_refused() -> None:
    if _metrics is not None:
        _metrics.storage_refusals.inc()


def finalize_put_off() -> None:
    if _metrics is not None:
        _metrics.finalize_retries.inc()


def engine_loaded(model: str) -> None:
    _count("engine_loads", model)
    _set("engine_loaded", model, 1)


def engine_unloaded(model: str) -> None:
    """The model's engine stopped: its live engine gauges go to zero."""
    for name in ENGINE_GAUGES:
        _set(name, model, 0)


def engine_load_failed(model: str) -> None:
    _count("engine_load_failures", model)


def engine_restarted(model: str) -> None:
    _count("engine_restarts", model)


def loop_lag(seconds: float) -> None:
    if _metrics is not None:
        _metrics.loop_lag.observe(max(0.0, seconds))


def delivery_attempt(kind: str, outcome: str, seconds: float) -> None:
    if _metrics is not None:
        _metrics.delivery_attempts.labels(kind, outcome).inc()
        _metrics.delivery_seconds.labels(kind).observe(max(0.0, seconds))


def connection_refused(reason: str) -> None:
    if _metrics is not None:
        _metrics.connections_refused.labels(reason).inc()


def delivery_breaker_opened(kind: str) -> None:
    if _metrics is not None:
        _metrics.delivery_breakers_opened.labels(kind).inc()


def engine_stats(
    model: str,
    *,
    running: int | None = None,
    waiting: int | None = None,
    kv_cache_usage: float | None = None,
    prefix_queries: int = 0,
    prefix_hits: int = 0,
    hit_rate: float | None = None,
    preemptions: int = 0,
) -> None:
    """One step of vLLM's scheduler stats for ``model`` (see ``engine_stats.py``)."""
    for name, value in (
        ("engine_running_requests", running),
        ("engine_waiting_requests", waiting),
        ("engine_kv_cache_usage_ratio", kv_cache_usage),
        ("engine_prefix_cache_hit_rate", hit_rate),
    ):
        if value is not None:
            _set(name, model, value)
    _count("engine_prefix_cache_queries", model, prefix_queries)
    _count("engine_prefix_cache_hits", model, prefix_hits)
    _count("engine_preemptions", model, preemptions)
