"""A batch's timeline: five points in time and the four phases between them.

::

    created ─validation─▶ validated ─queue─▶ first line started ─run─▶ last line finished
                                                                     ─finalize─▶ ended

- created: ``created_at``; validated: ``in_progress_at`` (validation ends when the batch
  goes ``in_progress``); ended: ``completed_at`` (or ``failed_at``, ``cancelled_at``,
  ``expired_at``). These are OpenAI's fields, whole seconds.
- first line started: ``first_line_started_at``, the earliest time a worker sent one of the
  batch's lines to the engine; last line finished: ``last_line_finished_at``, the time its
  last result line was saved (while it runs: the latest save so far). Both are ours, epoch
  seconds as floats.

A phase is known once both of its ends are; a negative span (a whole-second point rounded
down past a precise one) counts as zero. ``metrics.batch_phases`` records a completed
batch's phases; the dashboard shows them on the batch's page.
"""

from __future__ import annotations

from typing import Final

PHASES: Final = ("validation", "queue", "run", "finalize")


def phases(
    created_at: float,
    in_progress_at: float | None,
    first_line_started_at: float | None,
    last_line_finished_at: float | None,
    ended_at: float | None,
) -> dict[str, float]:
    """Seconds spent in each phase whose two ends are known, in ``PHASES`` order."""
    points = (created_at, in_progress_at, first_line_started_at, last_line_finished_at, ended_at)
    return {
        name: max(0.0, float(end - start))
        for name, start, end in zip(PHASES, points, points[1:], strict=False)
        if start is not None and end is not None
    }
