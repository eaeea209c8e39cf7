"""Event-loop lag: how late the server's loop runs a short timer.

The API, the in-process worker and the services share one event loop; anything that holds
it (a long callback, or too many short ones at once) delays every request. A watcher
sleeps ``interval`` seconds again and again and records how much later than asked it woke
up (``vllm_batch_event_loop_lag_seconds``); a stall of ``warn_after`` seconds or more is
logged as a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vllm_batch.observability import metrics

log = logging.getLogger(__name__)
LAG_INTERVAL = 0.05
LAG_WARNING = 0.5


async def watch_loop_lag(
    shutdown: asyncio.Event,
    *,
    interval: float = LAG_INTERVAL,
    warn_after: float = LAG_WARNING,
    on_lag: Callable[[float], None] | None = None,
) -> None:
    """Measure the loop's lag until ``shutdown``; ``on_lag`` also gets every measurement."""
    loop = asyncio.get_running_loop()
    while not shutdown.is_set():
        start = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - start - interval)
        metrics.loop_lag(lag)
        if on_lag is not None:
            on_lag(lag)
        if lag >= warn_after:
            log.warning("the event loop was blocked for %.0f ms", lag * 1000)
