"""How vLLM starts its engine processes: forked from this one on CPU, where that is safe.

vLLM's CPU platform sets ``VLLM_WORKER_MULTIPROC_METHOD=spawn``, so each engine process
starts a fresh interpreter and imports vLLM and torch again. Forked, it inherits them: a
start of the tiny model took 12 s and 10 CPU-s here, against 27 s and 19 CPU-s spawned
(``vllm-batch run`` of 16 lines, whole process).

A child forked after its parent ran torch's OpenMP pool hangs at its first parallel
region. So only a command whose process has run no torch work yet (``serve``, ``worker``,
serve's worker child, ``run``: they call ``allow_fork`` first) forks, and only at its first
engine start; a restart or a model swap spawns, as vLLM does. A method the user set is
always kept, and vLLM still spawns where it must (in a Ray actor, after CUDA is set up).

A fork copies only the forking thread: a lock another thread held stays held in the child.
So the log handlers' locks are taken around the fork (no thread is half-way through
writing a log line to stderr), and the commands read stdin without a Python file object.
The child drops the parent's signal wakeup descriptor, which it would otherwise share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterator

METHOD_ENV = "VLLM_WORKER_MULTIPROC_METHOD"
_may_fork = False
"""This process has run no torch work, and has started no engine yet."""
_forking = False
_held: list[logging.Handler] = []


def allow_fork() -> None:
    """This process (a command that has run no torch work yet) may fork its first engine."""
    global _may_fork
    _may_fork = True


def chosen_method() -> str | None:
    """The start method the user set, read before vLLM's platform sets its own."""
    return os.environ.get(METHOD_ENV)


@contextlib.contextmanager
def engine_start(user_method: str | None) -> Iterator[str | None]:
    """Around the launch of vLLM's engine processes: fork them where vLLM's platform asked
    for ``spawn`` and ``allow_fork`` holds; yields the method in effect."""
    global _may_fork
    platform_method = os.environ.get(METHOD_ENV)
    fork = _may_fork and user_method is None and platform_method == "spawn"
    _may_fork = False  # the engine runs requests from now on: later starts spawn
    if not fork:
        yield platform_method
        return
    global _forking
    os.environ[METHOD_ENV] = "fork"
    _forking = True
    try:
        yield "fork"
    finally:
        _forking = False
        os.environ[METHOD_ENV] = "spawn"


def _log_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            found[id(handler)] = handler
    return list(found.values())


def _before_fork() -> None:
    if _forking:
        for handler in _log_handlers():
            handler.acquire()
            _held.append(handler)


def _after_fork_in_parent() -> None:
    while _held:
        _held.pop().release()


def _after_fork_in_child() -> None:
    _held.clear()  # logging has made the child's handler locks anew
    if _forking:
        # The parent's event loop reads signals from a wakeup descriptor the child shares:
        # a SIGTERM sent to the engine process (vLLM stops it so) would stop the parent.
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
