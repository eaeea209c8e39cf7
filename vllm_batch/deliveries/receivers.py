"""Per-receiver isolation for deliveries: a concurrency limit and a circuit breaker per host.

A delivery's *receiver* is the host of its webhook URL (``webhook:hooks.example.com``) or
the result handler it runs (``handler:s3``). Each dispatcher keeps, per receiver:

- at most ``VLLM_BATCH_DELIVERY_HOST_CONCURRENCY`` attempts in flight, so a receiver that
  accepts connections and never answers holds only that many of the process's slots;
- a circuit breaker. ``closed``: attempts run, consecutive failures are counted (a
  timeout, a connection error, HTTP 429 or 5xx, a handler that fails; any other answer
  proves the host alive). Once one has failed, no more attempts are in flight than
  failures it would still take to open it: a dead receiver gets at most the larger of the
  two settings' attempts before it opens. After ``VLLM_BATCH_DELIVERY_BREAKER_FAILURES``
  in a row it is ``open`` for ``VLLM_BATCH_DELIVERY_BREAKER_COOLDOWN`` seconds: nothing is
  sent there, and its due deliveries wait without an attempt being counted (their 72 h
  horizon still runs: one that passes it meanwhile ends ``failed``). Then ``half_open``:
  one probe attempt; success closes the breaker, failure opens it for another cool-down.

Pure bookkeeping, no I/O: the dispatcher asks :meth:`ReceiverGate.limits` before it
claims and reports every attempt's start and end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from vllm_batch.batches.store.outbox import Limits
from vllm_batch.deliveries.webhook import Outcome


def is_receiver_failure(outcome: Outcome) -> bool | None:
    """Whether ``outcome`` counts against its receiver: True (down or overloaded), False
    (it answered), None (says nothing about it: the URL was refused before any contact)."""
    if outcome.ok:
        return False
    if outcome.permanent:
        return None
    code = outcome.status_code
    return code is None or code == 429 or code >= 500


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """One receiver's breaker; times are ``time.monotonic`` seconds."""

    failures_to_open: int
    cooldown: float
    failures: int = 0
    """Consecutive failures since the last success."""
    opened_at: float | None = None

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now < self.opened_at + self.cooldown:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def reopens_at(self) -> float | None:
        """When an open breaker lets a probe through (None: it is closed)."""
        return None if self.opened_at is None else self.opened_at + self.cooldown

    def record(self, failed: bool, now: float) -> bool:
        """Count one attempt's end; True if this failure opened (or re-opened) the breaker."""
        if not failed:
            self.failures, self.opened_at = 0, None
            return False
        self.failures += 1
        state = self.state(now)
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.failures >= self.failures_to_open
        ):
            self.opened_at = now
            return True
        return False  # closed below the threshold, or already open (a late straggler)


@dataclass
class ReceiverGate:
    """The per-receiver limiter and breakers of one dispatcher."""

    per_receiver: int
    failures_to_open: int
    cooldown: float
    clock: Callable[[], float] = time.monotonic
    in_flight: dict[str, int] = field(default_factory=dict)
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def breaker(self, receiver: str) -> CircuitBreaker:
        found = self.breakers.get(receiver)
        if found is None:
            found = self.breakers[receiver] = CircuitBreaker(self.failures_to_open, self.cooldown)
        return found

    def state(self, receiver: str) -> BreakerState:
        found = self.breakers.get(receiver)
        return BreakerState.CLOSED if found is None else found.state(self.clock())

    def room(self, receiver: str) -> int:
        """How many more attempts ``receiver`` may start now."""
        running = self.in_flight.get(receiver, 0)
        state = self.state(receiver)
        if state is BreakerState.OPEN:
            return 0
        if state is BreakerState.HALF_OPEN:
            cap = 1
        else:  # after a failure, no more in flight than failures it would take to open
            failures = self.breakers[receiver].failures if receiver in self.breakers else 0
            cap = min(self.per_receiver, self.failures_to_open - failures)
        return max(0, cap - running)

    def limits(self) -> Limits:
        busy = set(self.in_flight) | set(self.breakers)
        room = {name: self.room(name) for name in busy}
        return Limits(
            blocked=frozenset(name for name, left in room.items() if left <= 0),
            room={name: left for name, left in room.items() if left > 0},
            per_receiver=self.per_receiver,
        )

    def open_receivers(self) -> list[str]:
        """Receivers whose breaker is open now (no attempt may start)."""
        now = self.clock()
        return sorted(n for n, b in self.breakers.items() if b.state(now) is BreakerState.OPEN)

    def started(self, receiver: str) -> None:
        self.in_flight[receiver] = self.in_flight.get(receiver, 0) + 1

    def finished(self, receiver: str, outcome: Outcome | None) -> bool:
        """One attempt ended (``outcome`` None: cancelled, says nothing about the receiver).

        True if it opened the receiver's breaker."""
        left = self.in_flight.get(receiver, 0) - 1
        if left > 0:
            self.in_flight[receiver] = left
        else:
            self.in_flight.pop(receiver, None)
        failed = None if outcome is None else is_receiver_failure(outcome)
        if failed is None:
            return False
        breaker = self.breaker(receiver)
        opened = breaker.record(failed, self.clock())
        if not failed and breaker.opened_at is None and breaker.failures == 0:
            self.breakers.pop(receiver, None)  # healthy receivers keep no state
        return opened
