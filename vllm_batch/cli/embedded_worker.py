"""``vllm-batch embedded-worker`` (hidden): ``serve``'s worker, as its child process.

Started by ``runtime/worker_process.py``, never by hand. It reads its settings from the
first line of stdin, then wake-ups; it writes its status to the descriptor named in
``VLLM_BATCH_STATUS_FD``. Housekeeping, validation and deliveries stay in serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from vllm_batch.config import Settings

if TYPE_CHECKING:
    from vllm_batch.runtime.supervise import TaskHealth
    from vllm_batch.worker.loop import Worker


def embedded_worker() -> None:
    """Run serve's worker (started by serve; reads its settings from stdin)."""
    from vllm_batch.api.auth import KeyRing
    from vllm_batch.cli.build import setup_logging
    from vllm_batch.observability.logs import bound
    from vllm_batch.runtime.worker_process import STATUS_FD_ENV

    stdin = RawLines(sys.stdin.fileno())
    line = stdin.readline()
    if not line or STATUS_FD_ENV not in os.environ:
        raise SystemExit("embedded-worker: serve starts this command (settings on stdin)")
    settings = Settings.model_validate_json(line)
    setup_logging(settings, KeyRing.from_settings(settings).secrets())
    status = os.fdopen(int(os.environ.pop(STATUS_FD_ENV)), "w", buffering=1)
    with bound(process="worker"), asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(run_embedded_worker(settings, status, stdin))
    # Drained: chunks handed back, engine stopped. The interpreter's own teardown (vLLM's
    # and torch's threads) can abort the process; nothing is left for it to do.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def run_embedded_worker(settings: Settings, status_out: TextIO, stdin: RawLines) -> None:
    """The worker until SIGTERM or the end of stdin; its status every ``STATUS_SECONDS``."""
    from vllm_batch.batches.store_context import open_store
    from vllm_batch.observability import metrics
    from vllm_batch.runtime.process import make_engines, make_worker, preloading
    from vllm_batch.runtime.signals import stop_on_signals
    from vllm_batch.runtime.supervise import TaskHealth, supervise

    metrics.configure(settings)
    # The first model loads while the database opens.
    async with preloading(make_engines(settings)) as engines, open_store(settings) as store:
        worker = make_worker(store, engines)
        shutdown = asyncio.Event()
        stop = stop_on_signals(worker.ctx, shutdown)
        listen_stdin(stdin, asyncio.get_running_loop(), worker.ctx.notifier.wake, stop)
        health = TaskHealth("worker")
        reporter = asyncio.create_task(_report(worker, health, status_out, shutdown))
        try:
            await supervise(health, lambda: worker.run(shutdown), shutdown)
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)


async def _report(worker: Worker, health: TaskHealth, out: TextIO, shutdown: asyncio.Event) -> None:
    """Write the worker's status to serve every ``STATUS_SECONDS`` until ``shutdown``."""
    from vllm_batch.runtime.worker_process import STATUS_SECONDS
    from vllm_batch.worker.status import worker_status

    while not shutdown.is_set():
        status = worker_status(
            worker, alive=health.running, restarts=health.restarts, last_error=health.last_error
        )
        try:
            out.write(json.dumps(status.to_json(), default=str) + "\n")
        except OSError:  # serve is gone (its end of the pipe closed)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), STATUS_SECONDS)


class RawLines:
    """Lines read from a descriptor with ``os.read``: no Python file object, so no lock
    that a thread blocked in a read holds when vLLM forks its engine processes (a forked
    child closes ``sys.stdin`` and would wait for that lock for ever)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = b""

    def readline(self) -> bytes:
        """The next line with its newline; what is left at the end; b"" at the end."""
        while b"\n" not in self.pending:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.pending = self.pending, b""
                return line
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line + b"\n"


def listen_stdin(
    stdin: RawLines,
    loop: asyncio.AbstractEventLoop,
    wake: Callable[[], None],
    stop: Callable[[], None],
) -> None:
    """Each line on stdin wakes the worker; the end of stdin (serve gone) stops it."""

    def read() -> None:
        while stdin.readline():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop)

    threading.Thread(target=read, name="serve-stdin", daemon=True).start()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where installed (serve's own, through uvicorn), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
