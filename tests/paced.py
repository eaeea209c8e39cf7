"""The real engine at a pace the test sets, for tests that must catch a batch mid-way.

A ``Gate`` is a file holding how many requests each engine process may start (no file:
no limit). ``PacedEngine`` wraps the real engine: a request beyond the allowance waits,
cancellably, until the test raises it; each start is counted in ``<gate>.started-<pid>``.
A test therefore knows that a batch cannot finish before it acts, on a fast idle machine
as on a loaded one, and needs no sleep that hopes the machine is slow enough.

``python -m tests.paced serve|worker|run ARGS`` is ``vllm-batch`` with every engine paced
by the gate named in ``VLLM_BATCH_TEST_GATE`` (serve's worker process is started through
the same module, so it is paced too).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

GATE_ENV = "VLLM_BATCH_TEST_GATE"
PACED_CLI = "tests.paced"
VLLM_BATCH_CLI = True  # serve started here starts its worker child here too (entry_module)
POLL_SECONDS = 0.05


class Gate:
    """The test's side: set the allowance, read how many requests a process started."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def env(self) -> dict[str, str]:
        return {GATE_ENV: str(self.path)}

    def allow(self, requests: int | None) -> None:
        """Let each engine process start ``requests`` requests in all (None: no limit)."""
        if requests is None:
            self.path.unlink(missing_ok=True)
        else:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(str(requests))
            tmp.replace(self.path)

    def started(self, pid: int) -> int:
        """How many requests process ``pid`` and its live children (serve's worker
        process) have started."""
        pids = [pid]
        with contextlib.suppress(psutil.Error):
            pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
        return sum(self._started_by(one) for one in pids)

    def _started_by(self, pid: int) -> int:
        try:
            return int(Path(f"{self.path}.started-{pid}").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait_started(
        self, process: subprocess.Popen[bytes], at_least: int, log: Path, timeout: float = 300
    ) -> int:
        """Wait until ``process`` (its engine loaded) has started ``at_least`` requests."""
        deadline = time.monotonic() + timeout
        while (started := self.started(process.pid)) < at_least:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"process {process.pid} (exit code {process.poll()}) started {started} "
                    f"requests in {timeout:.0f}s, waited for {at_least}; its log ends:\n"
                    + log.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.05)
        return started


def allowance(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class PacedEngine:
    """Any engine, starting requests only within the gate's allowance."""

    def __init__(self, engine: Any, gate: Path) -> None:
        self._engine = engine
        self._gate = gate
        self._started = 0
        self._count_file = Path(f"{gate}.started-{os.getpid()}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def run(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        while (limit := allowance(self._gate)) is not None and self._started >= limit:
            await asyncio.sleep(POLL_SECONDS)
        self._started += 1
        self._count_file.write_text(str(self._started))
        return await self._engine.run(url, body, request_id)


def main() -> None:
    """``vllm-batch`` with paced engines (the gate from ``VLLM_BATCH_TEST_GATE``)."""
    from vllm_batch import cli, engines

    gate = Path(os.environ[GATE_ENV])
    make_engine = engines.make_engine

    def paced(spec: Any, settings: Any) -> Any:
        return PacedEngine(make_engine(spec, settings), gate)

    engines.make_engine = paced  # type: ignore[assignment]  # every process's engines
    sys.argv[0] = "vllm-batch"
    cli.main()


if __name__ == "__main__":
    main()
