"""Retry policies: one place that builds tenacity retriers, for every retry in the project.

Every policy waits with exponential backoff plus jitter
(``first_wait * 2**(n-1) + uniform(0, first_wait)``, capped at ``max_wait``), logs each retry
at WARNING as ``"<what> failed (attempt n/N: <error>); retrying in <s>s"`` and, when it gives
up, re-raises the last exception unchanged (no ``tenacity.RetryError`` to unwrap)::

    async for attempt in retrying(on=OSError, attempts=5, max_wait=30, log=log, what="save"):
        with attempt:
            await save()

``on`` is exception types, or a predicate for finer choices (e.g. only some HTTP statuses).
``attempts=None`` retries forever; ``deadline`` (seconds since the first attempt) also stops
it. ``what`` is logged (at ``level``): never put secrets (signed URLs) in it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NotRequired, TypedDict, Unpack

import tenacity

RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


class RetryArgs(TypedDict):
    """The policy both retriers take as keywords; see the module docstring."""

    on: RetryOn
    attempts: int | None
    max_wait: float
    log: logging.Logger
    what: str
    first_wait: NotRequired[float]
    deadline: NotRequired[float | None]
    level: NotRequired[int]


def retrying(
    *, sleep: Callable[[float], Awaitable[None] | None] | None = None, **args: Unpack[RetryArgs]
) -> tenacity.AsyncRetrying:
    """An async retrier (``async for attempt in ...: with attempt: ...``)."""
    return tenacity.AsyncRetrying(sleep=sleep or asyncio.sleep, **_options(args))


def retrying_sync(
    *, sleep: Callable[[float], None] | None = None, **args: Unpack[RetryArgs]
) -> tenacity.Retrying:
    """The same policy for blocking code (``for attempt in ...: with attempt: ...``)."""
    return tenacity.Retrying(sleep=sleep or time.sleep, **_options(args))


def _options(args: RetryArgs) -> dict[str, Any]:
    """The keyword arguments of ``tenacity.Retrying`` and ``AsyncRetrying`` but ``sleep``:
    what to retry, when to stop, how long to wait, and the log line before each wait."""
    on, attempts, first_wait = args["on"], args["attempts"], args.get("first_wait", 0.5)
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1 (or None: retry forever)")
    stop: tenacity.stop.stop_base = (
        tenacity.stop_never if attempts is None else tenacity.stop_after_attempt(attempts)
    )
    if (deadline := args.get("deadline")) is not None:
        stop = stop | tenacity.stop_after_delay(deadline)
    limit = "∞" if attempts is None else str(attempts)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        args["log"].log(
            args.get("level", logging.WARNING),
            "%s failed (attempt %d/%s: %s); retrying in %.1fs",
            args["what"],
            state.attempt_number,
            limit,
            describe(error),
            wait,
        )

    retry: tenacity.retry_base = (
        tenacity.retry_if_exception_type(on)
        if isinstance(on, type | tuple)
        else tenacity.retry_if_exception(on)
    )
    wait = tenacity.wait_exponential_jitter(
        multiplier=first_wait, max=args["max_wait"], jitter=first_wait
    )
    return dict(retry=retry, stop=stop, wait=wait, before_sleep=before_sleep, reraise=True)


def describe(error: BaseException | None) -> str:
    """``Type: message`` (or just the type when there is no message), for log lines."""
    if error is None:
        return "no error"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
