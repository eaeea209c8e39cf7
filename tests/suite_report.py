"""The suite's own costs, printed at the end of a run: wall time and the machine's peak used
memory (MemTotal - MemAvailable, sampled every 0.5 s by the controlling process), the number
that must stay under the memory budget while engines come and go. Also the collection order
that starts the slowest modules first, so that they do not form a tail."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

SAMPLE_SECONDS = 0.5
REPORT_FILE = Path(".pytest-suite-report.txt")
DURATIONS_FILE = Path(".pytest-durations.tsv")
"""Every phase of every test: start (s into the run), duration, xdist worker, outcome, id."""
_PHASES: list[tuple[float, float, str, str, str, str]] = []


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
        self.started_wall = time.time()
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


HEAVIEST_FIRST = (
    "tests/e2e/test_wheel_install.py",
    "tests/e2e/test_faults.py",
    "tests/e2e/test_durability.py",
    "tests/integration/test_remote_engine.py",
    "tests/e2e/test_vllm_run_batch_parity.py",
    "tests/e2e/test_worker_restarts.py",
    "tests/e2e/test_run_command.py",
    "tests/integration/test_pooling_batches.py",
    "tests/integration/test_openapi_fuzz.py",
    "tests/e2e/test_ray_executor.py",
    "tests/integration/test_continuous_feed.py",
    "tests/e2e/test_readme_snippets.py",
    "tests/e2e/test_model_swap.py",
)
"""Modules that take the longest (measured), started first. ``make test`` passes
``--no-loadscope-reorder``, so xdist hands out modules in collection order (by default it
puts the modules with the most tests first, leaving these few-test, long modules as a tail)."""
FIRST = ("tests/e2e/", "tests/integration/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> tuple[int, int]:
        module = item.nodeid.split("::", 1)[0]
        if module in HEAVIEST_FIRST:
            return (0, HEAVIEST_FIRST.index(module))
        return (1, next((i for i, p in enumerate(FIRST) if module.startswith(p)), len(FIRST)))

    items.sort(key=rank)  # stable: each module keeps its own order


def pytest_configure(config: pytest.Config) -> None:
    global _SAMPLER
    if not hasattr(config, "workerinput") and _SAMPLER is None:  # the controller only
        _SAMPLER = MemorySampler()
        from tests.engine_budget import EVENTS_FILE

        EVENTS_FILE.unlink(missing_ok=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _SAMPLER is not None:  # the controller: reports from every worker
        worker = getattr(report, "node", None)
        name = getattr(worker, "gateway", None)
        _PHASES.append(
            (
                report.start - _SAMPLER.started_wall,
                report.duration,
                getattr(name, "id", "-"),
                report.when or "-",
                report.outcome,
                report.nodeid,
            )
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SAMPLER is None:
        return
    line = _SAMPLER.stop()
    terminalreporter.write_sep("=", line)
    REPORT_FILE.write_text(line + "\n")
    rows = sorted(_PHASES)
    DURATIONS_FILE.write_text(
        "start\tseconds\tworker\tphase\toutcome\ttest\n"
        + "".join(f"{a:.1f}\t{d:.2f}\t{w}\t{p}\t{o}\t{t}\n" for a, d, w, p, o, t in rows)
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Each xdist worker, as it ends, kills what a crashed worker left running."""
    if hasattr(session.config, "workerinput"):
        from tests.engine_budget import reap_orphan_groups

        reap_orphan_groups()
