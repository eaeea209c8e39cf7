"""The scheduling policy: a batch's shares, latest start and urgency.

One module for both places that order work: the claim (``store/queries.py``'s
``order_terms`` computes these terms in SQL, and a test compares the two row by row) and
the worker's in-flight window (``worker/chunk.py`` gives each chunk's lane its batch's
weight, deadline and urgency).
"""

from __future__ import annotations

from dataclasses import dataclass

DAY = 86400.0
MAX_DEADLINE_FACTOR = 1440.0


NO_DEADLINE = 365 * DAY
"""A batch without an expiry counts as due this far ahead, with a one-day window."""


@dataclass(frozen=True)
class BatchOrder:
    """Where a batch stands in the scheduling order; ``queries.order_terms`` computes the
    same three values in SQL for claims (a test compares them row by row)."""

    weight: float
    """Shares: ``priority_weight`` times ``deadline_factor`` of the batch's slack."""
    latest_start: float
    """Its deadline minus its estimated remaining work (earliest deadline first)."""
    urgent: bool
    """Its slack is below ``margin`` of its completion window: it goes before the rest."""


def batch_order(
    *,
    priority: int,
    remaining: int,
    created_at: float,
    expires_at: float | None,
    now: float,
    seconds_per_line: float,
    margin: float,
) -> BatchOrder:
    """A batch's weight, latest start and urgency, with ``remaining`` lines unfinished at
    ``seconds_per_line`` each (the worker's recent pace)."""
    expires = expires_at if expires_at is not None else now + NO_DEADLINE
    window = expires_at - created_at if expires_at is not None else DAY
    latest_start = expires - remaining * seconds_per_line
    slack = latest_start - now
    return BatchOrder(
        weight=priority_weight(priority) * deadline_factor(slack),
        latest_start=latest_start,
        urgent=slack < margin * window,
    )


def priority_weight(priority: int) -> float:
    """Shares for ``metadata.priority``: ``p + 1`` for ``p >= 0``, ``1 / (1 - p)`` below."""
    return float(priority + 1) if priority >= 0 else 1.0 / (1 - priority)


def deadline_factor(slack: float) -> float:
    """Extra shares as a deadline nears: ``1 day / slack``, between 1 and 1440.

    ``slack`` is the seconds left before the batch must start its remaining work to finish
    in its window: a fresh ``24h`` batch gets about 1 share, a fresh ``1h`` batch about 24,
    so the ``1h`` batch overtakes without the ``24h`` one ever stopping.
    """
    if slack <= DAY / MAX_DEADLINE_FACTOR:
        return MAX_DEADLINE_FACTOR
    return max(1.0, DAY / slack)
