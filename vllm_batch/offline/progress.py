"""Progress: a rich progress bar on a terminal, plain log lines every few seconds otherwise."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from vllm_batch.pipeline.line_result import LineResult

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Counts for this run; rates cover only lines finished by this process (not resumed ones)."""

    total: int
    resumed: int = 0
    finished: int = 0
    errors: int = 0
    output_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.resumed + self.finished

    def add(self, result: LineResult) -> None:
        self.finished += 1
        self.errors += result.is_error
        self.output_tokens += result.output_tokens

    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def req_per_s(self) -> float:
        return self.finished / self.elapsed()

    def tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed()

    def eta_seconds(self) -> float | None:
        rate = self.req_per_s()
        return (self.total - self.done) / rate if rate > 0 else None

    def summary(self) -> str:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_seconds()
        eta_text = f", ETA {eta:.0f}s" if eta is not None and self.done < self.total else ""
        return (
            f"{self.done}/{self.total} done ({percent:.1f}%), {self.req_per_s():.2f} req/s, "
            f"{self.tok_per_s():.1f} tok/s, {self.errors} errors{eta_text}"
        )


class Progress:
    """Reports ``stats``; ``tick`` is called about twice a second, ``close`` once at the end."""

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats

    def start(self) -> None:
        """Called once the engine is up (rates are measured from here)."""
        self.stats.started = time.monotonic()

    def tick(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LogProgress(Progress):
    """``progress: done/total ...`` log lines every ``interval`` seconds, and a final one."""

    def __init__(self, stats: RunStats, interval: float) -> None:
        super().__init__(stats)
        self.interval = interval
        self._last = 0.0

    def start(self) -> None:
        super().start()
        self._last = time.monotonic()
        log.info("progress: %s", self.stats.summary())

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("progress: %s", self.stats.summary())

    def close(self) -> None:
        log.info("progress: %s", self.stats.summary())


class BarProgress(Progress):
    """A rich progress bar on stderr: done/total, req/s, output tok/s, errors, ETA."""

    def __init__(self, stats: RunStats) -> None:
        super().__init__(stats)
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            refresh_per_second=2,
        )
        self._task: Any = None

    def start(self) -> None:
        super().start()
        self._task = self._bar.add_task(
            "batch", total=self.stats.total, completed=self.stats.done, rates=self._rates()
        )
        self._bar.start()

    def _rates(self) -> str:
        s = self.stats
        return f"{s.req_per_s():.2f} req/s  {s.tok_per_s():.1f} tok/s  {s.errors} errors"

    def tick(self) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=self.stats.done, rates=self._rates())

    def close(self) -> None:
        self.tick()
        self._bar.stop()
        log.info("progress: %s", self.stats.summary())


def make_progress(stats: RunStats, *, interval: float, tty: bool | None = None) -> Progress:
    """A bar when stderr is a terminal (or ``tty`` says so), log lines otherwise."""
    if tty is None:
        tty = sys.stderr.isatty()
    return BarProgress(stats) if tty else LogProgress(stats, interval)
