"""How a worker process stops: on SIGTERM or SIGINT, at once and gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from vllm_batch.worker.context import WorkerContext


def stop_on_signals(ctx: WorkerContext, shutdown: asyncio.Event) -> Callable[[], None]:
    """Make SIGTERM and SIGINT stop the worker of ``ctx``; returns that stop, for other
    causes (serve gone). The worker hands its chunks back; an engine load under way is
    aborted (it would delay the exit until it ends)."""

    def stop() -> None:
        shutdown.set()
        ctx.notifier.wake()
        ctx.engines.abort_loading()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    return stop
