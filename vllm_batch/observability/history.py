"""The dashboard's recent history: one hour of samples of the shared database, in memory.

Every ``interval`` seconds the sampler reads the counters of the batches that can still
change (``BatchReading``: live ones, ones made since the last sample, ones live last time)
and ``History.record`` turns them into one ``Sample``: per owner (API key name), the lines
completed and failed and the output tokens added since the previous sample, and the
queued and running lines right now. Only owners with something to report appear in a
sample, so memory follows activity, not the number of keys.

A batch seen for the first time adds all its counts, except in the very first sample,
which only sets the baseline (the database's past is not this process's history). Counts
that go down (a batch deleted, a lease taken over) add nothing.

Rates are the deltas divided by the seconds since the previous sample. Each batch that
moves also gets its own series of ``(t, completed, failed)`` points; a point is kept only
when the counts change (plus the last unchanged one before a change, so a pause draws
flat), so idle batches cost nothing. Both rings keep ``window`` seconds and are bounded.

Each process samples the shared database itself, so every API process of a deployment
has the whole history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
WINDOW_SECONDS = 3600.0
MAX_BATCHES = 500
"""Batch series kept at most (the least recently moved go first)."""
NEW_BATCH_SLACK_SECONDS = 60.0
"""Batches made this long before the previous sample are read again, so one committed
late (its id older than the sample) is still counted once."""
ALL = "*"
"""``History.series`` scope for every owner's numbers together (admin callers)."""


@dataclass(frozen=True)
class BatchReading:
    """One batch's counters and open lines at a sample."""

    id: str
    owner: str | None
    live: bool
    """Its status may still change its counters (validating, in progress, finalizing,
    cancelling)."""
    completed: int
    failed: int
    output_tokens: int
    queued_lines: int = 0
    running_lines: int = 0


@dataclass
class OwnerPoint:
    """One owner's share of a sample: deltas since the previous sample and gauges."""

    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    queued_lines: int = 0
    running_lines: int = 0

    def __bool__(self) -> bool:
        return any(vars(self).values())

    def add(self, other: OwnerPoint) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.output_tokens += other.output_tokens
        self.queued_lines += other.queued_lines
        self.running_lines += other.running_lines


@dataclass
class Sample:
    """One sample: its time, the seconds since the previous one (None for the first) and
    the owners with anything to report."""

    t: float
    dt: float | None
    owners: dict[str | None, OwnerPoint] = field(default_factory=dict)


@dataclass
class Series:
    """Columns of one scope's history, oldest first (one entry per sample)."""

    t: list[float] = field(default_factory=list)
    lines_per_second: list[float | None] = field(default_factory=list)
    tokens_per_second: list[float | None] = field(default_factory=list)
    completed_lines: list[int] = field(default_factory=list)
    """Lines completed since the window's first sample (cumulative)."""
    failed_lines: list[int] = field(default_factory=list)
    queued_lines: list[int] = field(default_factory=list)
    running_lines: list[int] = field(default_factory=list)


def rate(delta: int, dt: float | None) -> float | None:
    """``delta`` per second over ``dt`` seconds; None without a previous sample."""
    if dt is None or dt <= 0:
        return None
    return max(0, delta) / dt


@dataclass
class BatchTrack:
    """One batch's ``(t, completed, failed)`` points, kept on change only."""

    owner: str | None
    points: deque[tuple[float, int, int]]
    flat_since: float | None = None
    """The latest sample whose counts equalled the last point (None: none since it)."""

    @property
    def last_seen(self) -> float:
        last = self.points[-1][0]
        return max(last, self.flat_since or last)

    def add(self, t: float, completed: int, failed: int) -> None:
        if self.points:
            _, done, bad = self.points[-1]
            if (done, bad) == (completed, failed):
                self.flat_since = t
                return
            if self.flat_since is not None:  # the pause before this change stays flat
                self.points.append((self.flat_since, done, bad))
        self.flat_since = None
        self.points.append((t, completed, failed))

    def snapshot(self, since: float) -> list[tuple[float, int, int]]:
        """The points from ``since`` on, ending with the latest sample's counts."""
        points = [p for p in self.points if p[0] >= since]
        if self.flat_since is not None and self.points:
            points.append((self.flat_since, *self.points[-1][1:]))
        return points


class History:
    """Samples of the last ``window`` seconds and per-batch progress (see the module doc)."""

    def __init__(
        self,
        interval: float = 5.0,
        window: float = WINDOW_SECONDS,
        max_batches: int = MAX_BATCHES,
    ) -> None:
        self.interval = interval
        self.window = window
        self.max_batches = max_batches
        capacity = math.ceil(window / interval) + 1
        self.samples: deque[Sample] = deque(maxlen=capacity)
        self.points_per_batch = 2 * capacity
        self.batches: OrderedDict[str, BatchTrack] = OrderedDict()
        self.counts: dict[str, tuple[int, int, int, bool]] = {}
        """Each batch read last time: completed, failed, output tokens, live."""
        self.last_t: float | None = None

    # ---------------------------------------------------------------- recording

    def created_since(self, now: float) -> float:
        """Read batches made since this time too (the previous sample, with slack)."""
        return (self.last_t if self.last_t is not None else now) - NEW_BATCH_SLACK_SECONDS

    def live_ids(self) -> set[str]:
        """Batches live at the previous sample: read again for their last counts."""
        return {batch_id for batch_id, (*_, live) in self.counts.items() if live}

    def record(self, t: float, readings: Iterable[BatchReading]) -> Sample:
        """Add the sample at ``t`` made of ``readings`` (see the module doc)."""
        first = self.last_t is None
        sample = Sample(t=t, dt=None if self.last_t is None else t - self.last_t)
        counts: dict[str, tuple[int, int, int, bool]] = {}
        for r in readings:
            known = self.counts.get(r.id)
            point = OwnerPoint(queued_lines=r.queued_lines, running_lines=r.running_lines)
            if known is not None or not first:
                done, bad, tokens, _ = known or (0, 0, 0, True)
                point.completed = max(0, r.completed - done)
                point.failed = max(0, r.failed - bad)
                point.output_tokens = max(0, r.output_tokens - tokens)
            if point:
                sample.owners.setdefault(r.owner, OwnerPoint()).add(point)
            counts[r.id] = (r.completed, r.failed, r.output_tokens, r.live)
            if r.live or r.id in self.batches or (known is None and not first):
                self.track(r.id, r.owner, t, r.completed, r.failed)
        self.counts = counts
        self.last_t = t
        self.samples.append(sample)
        self.forget_batches(t)
        return sample

    def track(self, batch_id: str, owner: str | None, t: float, done: int, bad: int) -> None:
        track = self.batches.get(batch_id)
        if track is None:
            track = self.batches[batch_id] = BatchTrack(owner, deque(maxlen=self.points_per_batch))
        track.add(t, done, bad)
        self.batches.move_to_end(batch_id)

    def forget_batches(self, now: float) -> None:
        """Drop series idle for a whole window, then the oldest over ``max_batches``."""
        for batch_id in [b for b, tr in self.batches.items() if tr.last_seen < now - self.window]:
            del self.batches[batch_id]
        while len(self.batches) > self.max_batches:
            self.batches.popitem(last=False)

    # ---------------------------------------------------------------- reading

    def series(self, owner: str | None, now: float | None = None) -> Series:
        """The window's columns for ``owner``'s batches (``ALL``: everyone's)."""
        since = (time.time() if now is None else now) - self.window
        out = Series()
        completed = failed = 0
        for sample in self.samples:
            if sample.t < since:
                continue
            if owner == ALL:
                point = OwnerPoint()
                for part in sample.owners.values():
                    point.add(part)
            else:
                point = sample.owners.get(owner) or OwnerPoint()
            if out.t:  # the first sample's deltas happened before the window
                completed += point.completed
                failed += point.failed
            out.t.append(round(sample.t, 3))
            lines = rate(point.completed + point.failed, sample.dt)
            tokens = rate(point.output_tokens, sample.dt)
            out.lines_per_second.append(None if not out.completed_lines else lines)
            out.tokens_per_second.append(None if not out.completed_lines else tokens)
            out.completed_lines.append(completed)
            out.failed_lines.append(failed)
            out.queued_lines.append(point.queued_lines)
            out.running_lines.append(point.running_lines)
        return out

    def batch_points(self, batch_id: str, now: float | None = None) -> list[tuple[float, int, int]]:
        """``(t, completed, failed)`` of ``batch_id`` over the window (empty if untracked)."""
        track = self.batches.get(batch_id)
        if track is None:
            return []
        since = (time.time() if now is None else now) - self.window
        return track.snapshot(since)


Reader = Callable[[float, set[str]], Awaitable[Sequence[BatchReading]]]
"""``read(created_since, live_ids)``: the readings of one sample (see ``History``)."""


async def sample_forever(
    history: History,
    read: Reader,
    shutdown: asyncio.Event,
    clock: Callable[[], float] = time.time,
) -> None:
    """Record a sample every ``history.interval`` seconds until ``shutdown``; a failed read
    (database away) is logged once per outage and skipped."""
    failing = False
    while not shutdown.is_set():
        now = clock()
        try:
            readings = await read(history.created_since(now), history.live_ids())
        except Exception as exc:
            if not failing:
                log.warning("dashboard history: a sample failed (%s)", exc.__class__.__name__)
            failing = True
        else:
            failing = False
            history.record(now, readings)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), history.interval)
