"""The event-loop lag watcher: a blocked loop is measured and logged."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from vllm_batch.observability.loop_lag import watch_loop_lag


async def test_a_blocking_callback_is_measured_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lags: list[float] = []
    shutdown = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="vllm_batch.observability.loop_lag")
    task = asyncio.create_task(watch_loop_lag(shutdown, interval=0.02, on_lag=lags.append))
    await asyncio.sleep(0.1)
    time.sleep(0.6)  # holds the loop, as a slow callback would
    await asyncio.sleep(0.1)
    shutdown.set()
    await asyncio.wait_for(task, 5)
    assert max(lags) >= 0.5
    assert any("event loop was blocked for" in r.getMessage() for r in caplog.records)
