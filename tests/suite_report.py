"""The suite's own costs, printed at the end of a run: wall time and the machine's peak used
memory (MemTotal - MemAvailable, sampled every 0.5 s by the controlling process), the number
that must stay under the memory budget while engines come and go. Also the collection order
that keeps the slowest modules from forming a tail."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

SAMPLE_SECONDS = 0.5
REPORT_FILE = Path(".pytest-suite-report.txt")


def used_bytes() -> int:
    """The machine's used memory now: MemTotal - MemAvailable."""
    fields: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class MemorySampler:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.baseline = used_bytes()
        self.peak = self.baseline
        self.peak_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            used = used_bytes()
            if used > self.peak:
                self.peak, self.peak_at = used, time.monotonic() - self.started

    def stop(self) -> str:
        self._stop.set()
        self._thread.join(2)
        gib = 1024**3
        return (
            f"suite: {time.monotonic() - self.started:.0f} s wall; peak used memory "
            f"{self.peak / gib:.2f} GiB at {self.peak_at:.0f} s "
            f"(machine's MemTotal - MemAvailable; {self.baseline / gib:.2f} GiB at start)"
        )


_SAMPLER: MemorySampler | None = None


FIRST = ("tests/e2e/", "tests/integration/")
"""Collected first, in this order: xdist (``--dist loadfile``) hands out modules in
collection order, so the long end-to-end modules start at once instead of forming a tail."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next((i for i, prefix in enumerate(FIRST) if path.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_configure(config: pytest.Config) -> None:
    global _SAMPLER
    if not hasattr(config, "workerinput") and _SAMPLER is None:  # the controller only
        _SAMPLER = MemorySampler()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SAMPLER is None:
        return
    line = _SAMPLER.stop()
    terminalreporter.write_sep("=", line)
    REPORT_FILE.write_text(line + "\n")
