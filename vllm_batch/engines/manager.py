"""Keeps at most one engine loaded and swaps models on demand (one GPU at a time).

After a CUDA out-of-memory error, ``shrink`` halves the model's in-flight window and
``max_num_seqs`` (down to floors) and restarts its engine with the smaller value; the
limits stay for the life of the process.

A model whose engine fails to start is remembered as failed (error and time) and is not
tried again before its backoff (``first_retry`` doubling up to ``max_retry``) has passed:
``get`` raises ``EngineLoadError`` at once meanwhile, and the worker stops claiming work
for it (``claimable_models``) and retries the load itself (``due_retries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_batch.config import ModelSpec
from vllm_batch.engines.engine import Engine, ResizableEngine
from vllm_batch.observability import metrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec], Engine]
FIRST_LOAD_RETRY_SECONDS = 5.0
MAX_LOAD_RETRY_SECONDS = 60.0


class EngineLoadError(Exception):
    """A model's engine could not start. Its work waits; it is never failed for this."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f"engine for {model} cannot load: {message}")
        self.model = model


@dataclass
class LoadFailure:
    """Why and since when a model cannot load, and when to try again."""

    model: str
    error: str
    first_failed_at: float
    last_failed_at: float
    attempts: int
    retry_at: float

    def describe(self, now: float, *, details: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": "failed",
            "failed_attempts": self.attempts,
            "failing_for_seconds": round(now - self.first_failed_at, 1),
            "next_retry_in_seconds": round(max(0.0, self.retry_at - now), 1),
        }
        if details:
            out["error"] = self.error
            out["last_failed_at"] = int(self.last_failed_at)
        return out


@dataclass
class EngineLimits:
    """A model's limits lowered after CUDA out-of-memory errors (None: not lowered)."""

    max_in_flight: int | None = None
    max_num_seqs: int | None = None


@dataclass(frozen=True)
class Shrink:
    """One OOM back-off step: the window and ``max_num_seqs`` before and after."""

    model: str
    in_flight: tuple[int, int] | None
    """None when the window is already at its floor."""
    max_num_seqs: tuple[int, int] | None
    """None when at its floor, or the engine cannot change it."""
    restarted: bool


class EngineManager:
    """Owns the worker's engine; ``get`` loads the asked-for model, unloading another."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        factory: EngineFactory,
        *,
        first_retry: float = FIRST_LOAD_RETRY_SECONDS,
        max_retry: float = MAX_LOAD_RETRY_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = asyncio.Lock()
        self._first_retry = first_retry
        self._max_retry = max_retry
        self._clock = clock
        self.state = "idle"
        """``idle``, ``loading <model>``, ``ready`` or ``failed``."""
        self.failures: dict[str, LoadFailure] = {}
        self.limits: dict[str, EngineLimits] = {}
        """Per model: limits lowered after CUDA out-of-memory errors."""
        self._starting: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def model_names(self) -> list[str]:
        return list(self.specs)

    @property
    def loaded_model(self) -> str | None:
        return self._engine.model_name if self._engine and self.state == "ready" else None

    @property
    def current(self) -> Engine | None:
        """The loaded engine, if one is ready."""
        return self._engine if self.state == "ready" else None

    @property
    def failed(self) -> bool:
        """Some served model cannot load right now."""
        return bool(self.failures)

    def claimable_models(self) -> list[str]:
        """Models the worker may take work for: none whose engine is known not to load."""
        return [name for name in self.specs if name not in self.failures]

    def due_retries(self) -> list[str]:
        """Failed models whose backoff has passed: time to try loading them again."""
        now = self._clock()
        return [name for name, f in self.failures.items() if f.retry_at <= now]

    def next_retry_in(self) -> float | None:
        """Seconds until the earliest load retry, or None if nothing failed."""
        if not self.failures:
            return None
        return max(0.0, min(f.retry_at for f in self.failures.values()) - self._clock())

    def describe(self, *, details: bool) -> dict[str, Any]:
        """The engine state for ``/`` and ``/ready`` (errors only with ``details``)."""
        now = self._clock()
        return {
            "state": self.state,
            "loaded_model": self.loaded_model,
            "failed_models": {
                name: failure.describe(now, details=details)
                for name, failure in self.failures.items()
            },
            "oom_limits": {name: vars(limits).copy() for name, limits in self.limits.items()},
        }

    def in_flight_window(self, engine: Engine) -> int:
        """How many requests to keep submitted to ``engine``: its own wish, or less after OOM."""
        cap = self.limits.get(engine.model_name, EngineLimits()).max_in_flight
        return engine.max_in_flight if cap is None else min(engine.max_in_flight, cap)

    async def shrink(self, model: str, *, min_in_flight: int, min_num_seqs: int) -> Shrink | None:
        """Halve ``model``'s window and ``max_num_seqs`` after an OOM; None if both are floored.

        A lower ``max_num_seqs`` needs a new engine: the current one is stopped and the next
        ``get`` starts one with the lower value (only engines that support it).
        """
        async with self._lock:
            engine = self._engine if self.loaded_model == model else None
            limits = self.limits.setdefault(model, EngineLimits())
            window = engine.max_in_flight if engine is not None else None
            if limits.max_in_flight is not None:
                window = min(window or limits.max_in_flight, limits.max_in_flight)
            resizable = isinstance(engine, ResizableEngine)
            seqs = limits.max_num_seqs
            if isinstance(engine, ResizableEngine):
                seqs = engine.max_num_seqs
            in_flight = _halve(window, min_in_flight)
            num_seqs = _halve(seqs, min_num_seqs)
            if in_flight is None and num_seqs is None:
                return None
            if in_flight is not None:
                limits.max_in_flight = in_flight[1]
            if num_seqs is not None:
                limits.max_num_seqs = num_seqs[1]
                if resizable:
                    await self._unload()
            return Shrink(model, in_flight, num_seqs, restarted=num_seqs is not None and resizable)

    async def get(self, model: str) -> Engine:
        """The engine for ``model``, started if needed; ``EngineLoadError`` if it cannot be."""
        async with self._lock:
            if self._engine is not None and self._engine.model_name == model:
                return self._engine
            if self._closing:
                raise EngineLoadError(model, "the process is shutting down")
            failure = self.failures.get(model)
            if failure is not None and failure.retry_at > self._clock():
                raise EngineLoadError(model, f"{failure.error} (backing off)")
            await self._unload()
            self.state = f"loading {model}"
            engine: Engine | None = None
            try:
                engine = self._factory(self.specs[model])
                cap = self.limits.get(model, EngineLimits()).max_num_seqs
                if cap is not None and isinstance(engine, ResizableEngine):
                    engine.set_max_num_seqs(cap)
                await self._start(engine)
            except asyncio.CancelledError:
                self.state = "idle"
                task = asyncio.current_task()
                if not self._closing or (task is not None and task.cancelling()):
                    raise
                # Stopped by ``abort_loading`` (shutdown), not by our caller's cancellation.
                log.info("loading %s stopped: the process is shutting down", model)
                if engine is not None:
                    await self._stop_quietly(engine)
                raise EngineLoadError(model, "loading stopped: shutting down") from None
            except Exception as exc:
                self._record_failure(model, exc)
                if engine is not None:
                    await self._stop_quietly(engine)
                raise EngineLoadError(model, self.failures[model].error) from exc
            self._engine = engine
            self.state = "ready"
            metrics.engine_loaded(model)
            if self.failures.pop(model, None) is not None:
                log.info("model %s loaded after earlier load failures", model)
            log.info("model %s loaded", model)
            return engine

    async def _start(self, engine: Engine) -> None:
        """``engine.start()`` as a task of its own, which ``abort_loading`` can cancel."""
        self._starting = asyncio.create_task(engine.start())
        try:
            await self._starting
        finally:
            self._starting = None

    async def preload(self) -> None:
        """Load the first model now; a failure is recorded (the worker retries it)."""
        with contextlib.suppress(EngineLoadError):
            await self.get(self.model_names[0])

    def abort_loading(self) -> None:
        """Shutdown: stop an engine load under way (its processes are terminated) and
        refuse new ones, so that the process can exit now instead of after the load."""
        self._closing = True
        if self._starting is not None:
            self._starting.cancel()

    def _record_failure(self, model: str, exc: BaseException) -> None:
        now = self._clock()
        previous = self.failures.get(model)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self._max_retry, self._first_retry * 2 ** (attempts - 1))
        delay *= random.uniform(0.8, 1.0)  # jitter: workers sharing a broken model spread out
        self.failures[model] = LoadFailure(
            model=model,
            error=f"{exc.__class__.__name__}: {exc}"[:500],
            first_failed_at=previous.first_failed_at if previous else now,
            last_failed_at=now,
            attempts=attempts,
            retry_at=now + delay,
        )
        self.state = "failed"
        metrics.engine_load_failed(model)
        log.error(
            "model %s failed to load (attempt %d): %s; retrying in %.0f s",
            model,
            attempts,
            self.failures[model].error,
            delay,
        )

    async def restart(self) -> None:
        """Drop the current engine (it broke); the next ``get`` starts a fresh one."""
        async with self._lock:
            if self._engine is not None:
                metrics.engine_restarted(self._engine.model_name)
            await self._unload()

    async def close(self) -> None:
        async with self._lock:
            await self._unload()

    async def _unload(self) -> None:
        if self._engine is None:
            return
        engine, self._engine = self._engine, None
        self.state = "idle"
        log.info("unloading model %s", engine.model_name)
        await self._stop_quietly(engine)
        metrics.engine_unloaded(engine.model_name)

    @staticmethod
    async def _stop_quietly(engine: Engine) -> None:
        try:
            await engine.stop()
        except Exception:
            log.exception("error while stopping the engine for %s", engine.model_name)


def _halve(value: int | None, floor: int) -> tuple[int, int] | None:
    """``(value, half of it but at least floor)`` if that is lower; else None."""
    if value is None:
        return None
    lower = max(floor, value // 2)
    return (value, lower) if lower < value else None
