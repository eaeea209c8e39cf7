"""Blocking engine start-up steps (imports, process launch) off the event loop.

vLLM's imports and ``AsyncLLM.from_vllm_config`` block for many seconds. Run in a daemon
thread, they leave the event loop free (the API answers, the input is read meanwhile), and
a process that gives up on a starting engine can exit without waiting for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import psutil

T = TypeVar("T")

REAP_INTERVAL = 0.1
"""Seconds between kills of stray engine processes while an abandoned start winds down."""


class DaemonCall(Generic[T]):
    """``fn()`` in a daemon thread; ``await`` it with ``result()`` (cancelling leaves it run)."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self._fn = fn
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] = self._loop.create_future()
        threading.Thread(target=self._target, name=name, daemon=True).start()

    def _target(self) -> None:
        try:
            self.value = self._fn()
        except BaseException as exc:  # handed to the awaiting task
            self.error = exc
        finally:
            self.done.set()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    async def result(self) -> T:
        await asyncio.shield(self._future)
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


async def in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` without blocking the event loop; a cancelled caller does not wait for it."""
    return await DaemonCall(fn, name).result()


async def launch_processes(fn: Callable[[], T], name: str, on_abandon: Callable[[T], None]) -> T:
    """``fn()`` (which starts child processes) in a daemon thread, stoppable mid-way.

    If the caller is cancelled, the child processes ``fn`` started are killed until
    ``fn`` returns (it fails once they are gone); if it succeeded anyway, ``on_abandon``
    gets its result to release it. Then the cancellation goes on.
    """
    before = set(multiprocessing.active_children())
    call = DaemonCall(fn, name)
    try:
        return await call.result()
    except asyncio.CancelledError:
        while not call.done.is_set():
            for proc in set(multiprocessing.active_children()) - before:
                if proc.pid is not None:
                    kill_tree(proc.pid)
            await asyncio.sleep(REAP_INTERVAL)
        if call.error is None and call.value is not None:
            on_abandon(call.value)
        raise


def kill_tree(pid: int) -> None:
    """SIGKILL process ``pid`` and its descendants. An engine process abandoned mid-start
    is killed, not asked: vLLM's engine core only logs a SIGTERM until it is built (a
    spawned one used to die of it while still importing; a forked one is past that)."""
    try:
        root = psutil.Process(pid)
        doomed = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
