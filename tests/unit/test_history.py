"""The dashboard history's ring buffer, deltas, rates and per-batch series (no database)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from vllm_batch.observability.history import (
    ALL,
    NEW_BATCH_SLACK_SECONDS,
    BatchReading,
    History,
    rate,
    sample_forever,
)


def reading(
    batch_id: str,
    completed: int,
    failed: int = 0,
    tokens: int = 0,
    *,
    owner: str | None = "a",
    live: bool = True,
    queued: int = 0,
    running: int = 0,
) -> BatchReading:
    return BatchReading(batch_id, owner, live, completed, failed, tokens, queued, running)


def test_rate() -> None:
    assert rate(10, 5.0) == 2.0
    assert rate(10, None) is None
    assert rate(10, 0.0) is None
    assert rate(-4, 2.0) == 0.0  # counts that went down add nothing


def test_first_sample_is_the_baseline_then_deltas_make_rates() -> None:
    history = History(interval=5)
    history.record(100.0, [reading("b1", 50, 2, 500, queued=40, running=8)])
    history.record(105.0, [reading("b1", 60, 3, 700, queued=32, running=8)])
    history.record(110.0, [reading("b1", 60, 3, 700, queued=32, running=0)])
    series = history.series(ALL, now=110.0)
    assert series.t == [100.0, 105.0, 110.0]
    assert series.lines_per_second == [None, 11 / 5, 0.0]
    assert series.tokens_per_second == [None, 200 / 5, 0.0]
    assert series.completed_lines == [0, 10, 10]  # the database's past is not counted
    assert series.failed_lines == [0, 1, 1]
    assert series.queued_lines == [40, 32, 32]
    assert series.running_lines == [8, 8, 0]


def test_a_new_batch_counts_whole_and_a_finished_one_once() -> None:
    history = History(interval=5)
    history.record(0.0, [])
    # Made and finished between two samples: all its lines count, once.
    history.record(5.0, [reading("quick", 7, 1, 70, live=False)])
    history.record(10.0, [reading("quick", 7, 1, 70, live=False)])
    series = history.series(ALL, now=10.0)
    assert series.completed_lines == [0, 7, 7]
    assert series.failed_lines == [0, 1, 1]
    assert series.lines_per_second == [None, 8 / 5, 0.0]
    assert history.live_ids() == set()


def test_live_batches_are_read_again_until_they_stop() -> None:
    history = History(interval=5)
    history.record(0.0, [reading("b1", 0, live=True), reading("old", 9, live=False)])
    assert history.live_ids() == {"b1"}
    history.record(5.0, [reading("b1", 4, live=False)])  # finished: no longer live
    assert history.live_ids() == set()
    assert history.created_since(7.0) == 5.0 - NEW_BATCH_SLACK_SECONDS
    assert history.series(ALL, now=5.0).completed_lines == [0, 4]


def test_series_per_owner_and_for_admins() -> None:
    history = History(interval=1)
    history.record(0.0, [])
    history.record(
        1.0,
        [
            reading("a1", 3, owner="a", queued=5),
            reading("b1", 10, owner="b", running=4),
            reading("n1", 1, owner=None),
        ],
    )
    assert history.series("a", now=1.0).completed_lines == [0, 3]
    assert history.series("a", now=1.0).queued_lines == [0, 5]
    assert history.series("b", now=1.0).running_lines == [0, 4]
    assert history.series("nobody", now=1.0).lines_per_second == [None, 0.0]
    everyone = history.series(ALL, now=1.0)
    assert everyone.completed_lines == [0, 14]
    assert everyone.queued_lines == [0, 5] and everyone.running_lines == [0, 4]
    # Sparse: an owner with nothing to report is not stored.
    history.record(2.0, [reading("a1", 3, owner="a"), reading("b1", 10, owner="b")])
    assert history.samples[-1].owners == {}


def test_the_ring_keeps_one_window() -> None:
    history = History(interval=5, window=60)
    for i in range(100):
        history.record(i * 5.0, [reading("b1", i)])
    assert len(history.samples) == 13  # 60 s / 5 s, plus one
    series = history.series(ALL, now=99 * 5.0)
    assert series.t[0] == 99 * 5.0 - 60 and series.t[-1] == 99 * 5.0
    assert series.lines_per_second[1:] == [0.2] * 12


def test_batch_points_are_kept_on_change_only() -> None:
    history = History(interval=5)
    history.record(0.0, [reading("b1", 0)])
    history.record(5.0, [reading("b1", 2)])
    for t in (10.0, 15.0, 20.0):  # paused: no new points
        history.record(t, [reading("b1", 2)])
    assert len(history.batches["b1"].points) == 2
    assert history.batch_points("b1", now=20.0) == [(0.0, 0, 0), (5.0, 2, 0), (20.0, 2, 0)]
    history.record(25.0, [reading("b1", 6, 1)])  # the pause stays flat before the change
    assert history.batch_points("b1", now=25.0) == [
        (0.0, 0, 0),
        (5.0, 2, 0),
        (20.0, 2, 0),
        (25.0, 6, 1),
    ]
    assert history.batch_points("missing") == []


def test_batch_series_are_bounded() -> None:
    history = History(interval=1, window=10, max_batches=3)
    history.record(0.0, [])
    for i in range(5):
        history.record(1.0 + i, [reading(f"b{i}", 1, live=False)])
    assert list(history.batches) == ["b2", "b3", "b4"]  # the least recently moved go first
    history.record(30.0, [])
    assert not history.batches  # idle for a whole window
    one = History(interval=1, window=10)
    for i in range(100):
        one.record(float(i), [reading("b", i)])
    assert len(one.batches["b"].points) == one.points_per_batch == 22


def test_old_terminal_batches_get_no_series() -> None:
    history = History(interval=5)
    history.record(0.0, [reading("done-long-ago", 10, live=False)])
    assert "done-long-ago" not in history.batches


async def test_sampler_records_and_survives_a_failed_read() -> None:
    history = History(interval=0.01)
    shutdown = asyncio.Event()
    calls: list[tuple[float, set[str]]] = []

    async def read(since: float, live: set[str]) -> Sequence[BatchReading]:
        calls.append((since, live))
        if len(calls) == 2:
            raise OSError("database away")
        if len(calls) >= 4:
            shutdown.set()
        return [reading("b1", len(calls))]

    clock = iter(float(i) for i in range(100))
    await asyncio.wait_for(sample_forever(history, read, shutdown, clock=lambda: next(clock)), 10)
    assert len(calls) == 4 and len(history.samples) == 3
    assert calls[2][1] == {"b1"}  # live last time: read again
    assert history.series(ALL, now=3.0).completed_lines == [0, 2, 3]


@pytest.mark.parametrize("interval", [0.5, 5.0])
def test_capacity_follows_the_interval(interval: float) -> None:
    history = History(interval=interval, window=3600)
    assert history.samples.maxlen == int(3600 / interval) + 1


def test_first_id_at_sorts_before_every_id_made_since() -> None:
    """The sampler's id range for "made since t" relies on ids sorting by creation time."""
    import time

    from vllm_batch.protocol.ids import first_id_at, new_id

    before = time.time()
    made = new_id("batch_")
    assert first_id_at("batch_", before) <= made < first_id_at("batch_", time.time() + 1)
