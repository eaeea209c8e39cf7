"""``serve``'s worker in a child process of its own (``worker_mode = "process"``).

The engine front end (vLLM's chat templates, tokenisation, detokenisation, response objects)
keeps a core busy in Python. Sharing the API's interpreter, it made requests wait: during a
12,000-line batch on the tiny model, ``GET /v1/batches/{id}`` had a p99 near 1 s with the
worker inline, and tens of ms with the worker in its own process
(benchmarks/results/api_latency_tiny.md). A thread does not help: the interpreter lock is
shared.

The child is ``vllm-batch embedded-worker``, started through the module that started this
process, so it makes the same engine that serve would.

- Its settings go as one JSON line on its stdin; each later line is a wake-up (work
  appeared). When its stdin closes, it stops.
- Every ``STATUS_SECONDS`` it writes its ``WorkerStatus`` as a JSON line on a pipe of its
  own (the descriptor in ``STATUS_FD_ENV``), for ``/ready``, ``/`` and the dashboard.
- SIGTERM drains it: its chunks are handed back and its engine is stopped. ``stop`` sends
  it, then SIGKILL after the grace period; and the kernel sends it when this process dies,
  even by ``kill -9`` (a SIGKILL would leave its engine processes running, holding their
  memory).
- A child that exits on its own is restarted with backoff (``run`` raises, under
  ``supervise``); ``/ready`` answers 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
from typing import Any

from vllm_batch.config import Settings
from vllm_batch.runtime.supervise import TaskHealth
from vllm_batch.worker.status import WorkerStatus

log = logging.getLogger(__name__)
STATUS_FD_ENV = "VLLM_BATCH_STATUS_FD"
STATUS_SECONDS = 0.5
COMMAND = "embedded-worker"
# A module-level flag in a ``__main__`` module that runs the vllm-batch CLI (``entry_module``).
CLI_ENTRY_MARK = "VLLM_BATCH_CLI"
PR_SET_PDEATHSIG = 1


class WorkerExited(RuntimeError):
    """The worker process ended while nobody asked it to."""


class WorkerProcess:
    """The parent's side: start, watch, wake and stop one child at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = TaskHealth("worker")
        self.status: WorkerStatus | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self.health.running

    def current_status(self) -> WorkerStatus:
        """The child's last status, with what only the parent knows (alive, restarts)."""
        status = self.status
        if status is None:
            status = WorkerStatus(
                worker_id="",
                ok=False,
                state={"enabled": True, "alive": self.alive, "engine": "idle"},
                reason="worker process is starting",
            )
        status = dataclasses.replace(
            status,
            state={**status.state, "restarts": self.health.restarts},
            details={**status.details, "last_error": self.health.last_error, "pid": self.pid},
        )
        if not self.alive:
            return status.not_running("worker process is not running (restarting)")
        return status

    async def run(self, shutdown: asyncio.Event) -> None:
        """One child from start to exit; ``WorkerExited`` if it ends before ``shutdown``."""
        self.status = None
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                entry_module(),
                COMMAND,
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
                env={**os.environ, STATUS_FD_ENV: str(write_fd)},
                preexec_fn=child_setup(os.getpid(), self.settings.worker_nice),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._proc = proc
        log.info("worker process %d started", proc.pid)
        reader = asyncio.create_task(self._read_status(read_fd))
        try:
            assert proc.stdin is not None
            proc.stdin.write(self.settings.model_dump_json().encode() + b"\n")
            code = await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: never leave the child behind
                proc.kill()
                await proc.wait()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if shutdown.is_set():
            log.info("worker process %d stopped (exit code %s)", proc.pid, code)
            return
        raise WorkerExited(f"worker process {proc.pid} exited with code {code}")

    def wake(self) -> None:
        """Work appeared: tell the child (it also polls)."""
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(b"wake\n")

    async def stop(self, grace: float) -> None:
        """SIGTERM (the child drains), then SIGKILL after ``grace`` seconds."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.error("worker process %d did not stop within %.0f s: killing it", proc.pid, grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _read_status(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                try:
                    self.status = WorkerStatus.from_json(json.loads(line))
                except (ValueError, TypeError) as exc:
                    log.warning("unreadable worker status line (%s)", exc)
        finally:
            transport.close()


def entry_module() -> str:
    """The module to start serve's worker child with: the one this process was started as
    (``python -m X``) if it is a vllm-batch command line (it sets ``CLI_ENTRY_MARK``, as
    ``python -m vllm_batch.cli`` and a wrapper such as the tests' paced CLI do), else the
    CLI's. ``python -m pytest`` or ``python -m uvicorn`` are not re-run as the worker."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if not name or name == "__main__" or not getattr(main, CLI_ENTRY_MARK, False):
        return "vllm_batch.cli"
    return str(name).removesuffix(".__main__")


def child_setup(parent: int, nice: int) -> Any:
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies (Linux), even mid-start,
    and runs at CPU niceness ``nice``."""

    def preexec() -> None:
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
        if nice:
            with contextlib.suppress(OSError):
                os.nice(nice)

    return preexec
