"""A batch's timeline phases (``observability/timeline.py``): pure arithmetic on its five
points, known only once both ends are, never negative."""

from __future__ import annotations

import pytest

from vllm_batch.observability.timeline import PHASES, phases


def test_every_phase_of_a_finished_batch() -> None:
    spans = phases(100, 101, 102.5, 110.25, 111)
    assert list(spans) == list(PHASES)
    assert spans == pytest.approx({"validation": 1.0, "queue": 1.5, "run": 7.75, "finalize": 0.75})


@pytest.mark.parametrize(
    ("points", "known"),
    [
        ((100, None, None, None, None), []),  # validating
        ((100, None, None, None, 104), []),  # failed validation: never validated
        ((100, 101, None, None, None), ["validation"]),  # queued
        ((100, 101, 103.5, None, None), ["validation", "queue"]),  # first line out
        ((100, 101, 103.5, 104.0, None), ["validation", "queue", "run"]),  # running
        ((100, 101, None, None, 120), ["validation"]),  # cancelled before any line ran
    ],
)
def test_a_phase_needs_both_ends(points: tuple[float | None, ...], known: list[str]) -> None:
    created, *rest = points
    assert created is not None
    assert list(phases(created, *rest)) == known


def test_whole_second_stamps_never_give_a_negative_phase() -> None:
    """OpenAI's stamps are whole seconds (rounded down): ``completed_at`` may read earlier
    than the precise time the last line was saved."""
    spans = phases(100, 100, 100.4, 101.7, 101)
    assert spans["finalize"] == 0.0
    assert all(seconds >= 0 for seconds in spans.values())
