"""The per-receiver limiter and circuit breaker of the delivery dispatcher (pure logic)."""

from __future__ import annotations

from vllm_batch.batches.store.outbox import receiver_of
from vllm_batch.deliveries.receivers import (
    BreakerState,
    CircuitBreaker,
    ReceiverGate,
    is_receiver_failure,
)
from vllm_batch.deliveries.webhook import Outcome

TIMEOUT = Outcome(False, error="ReadTimeout")
OK = Outcome(True, status_code=204)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_receiver_is_the_webhook_host_or_the_handler() -> None:
    assert receiver_of("webhook", "https://Hooks.Example.com:8443/a?t=1") == (
        "webhook:hooks.example.com"
    )
    assert receiver_of("webhook", "https://user:pw@hooks.example.com./b") == (
        "webhook:hooks.example.com"
    )
    assert receiver_of("webhook", "http://[::1]:9/x") == "webhook:::1"
    assert receiver_of("webhook", "http://[bad") == "webhook:"
    assert receiver_of("handler", "s3") == "handler:s3"


def test_what_counts_against_a_receiver() -> None:
    assert is_receiver_failure(TIMEOUT) is True
    assert is_receiver_failure(Outcome(False, status_code=503)) is True
    assert is_receiver_failure(Outcome(False, status_code=429)) is True
    assert is_receiver_failure(Outcome(False, status_code=404)) is False  # it answered
    assert is_receiver_failure(OK) is False
    assert is_receiver_failure(Outcome(False, error="refused", permanent=True)) is None


def test_breaker_opens_after_consecutive_failures_and_probes_after_the_cooldown() -> None:
    breaker = CircuitBreaker(failures_to_open=3, cooldown=60)
    assert [breaker.record(True, 0), breaker.record(True, 1)] == [False, False]
    assert breaker.record(False, 2) is False  # a success resets the count
    assert [breaker.record(True, t) for t in (3, 4, 5)] == [False, False, True]
    assert breaker.state(5) is BreakerState.OPEN and breaker.reopens_at() == 65
    assert breaker.record(True, 30) is False  # a straggler does not extend the cool-down
    assert breaker.state(64.9) is BreakerState.OPEN
    assert breaker.state(65) is BreakerState.HALF_OPEN
    assert breaker.record(True, 66) is True  # the probe failed: open again
    assert (breaker.state(100), breaker.reopens_at()) == (BreakerState.OPEN, 126)
    assert breaker.record(False, 127) is False  # the next probe succeeded
    assert (breaker.state(127), breaker.failures) == (BreakerState.CLOSED, 0)


def test_gate_limits_each_receiver_and_leaves_the_others_alone() -> None:
    gate = ReceiverGate(per_receiver=2, failures_to_open=3, cooldown=60, clock=Clock())
    assert gate.limits().blocked == frozenset() and gate.limits().room == {}
    gate.started("webhook:dead")
    assert gate.limits().room == {"webhook:dead": 1}
    gate.started("webhook:dead")
    limits = gate.limits()
    assert limits.blocked == {"webhook:dead"} and limits.per_receiver == 2
    assert gate.room("webhook:alive") == 2
    assert gate.finished("webhook:dead", None) is False  # cancelled: says nothing
    assert gate.room("webhook:dead") == 1
    assert gate.state("webhook:dead") is BreakerState.CLOSED


def test_gate_breaker_blocks_then_lets_one_probe_through() -> None:
    clock = Clock()
    gate = ReceiverGate(per_receiver=2, failures_to_open=3, cooldown=60, clock=clock)
    opened = []
    for _ in range(3):
        gate.started("webhook:dead")
        opened.append(gate.finished("webhook:dead", TIMEOUT))
    assert opened == [False, False, True]
    assert gate.room("webhook:dead") == 0 and "webhook:dead" in gate.limits().blocked
    assert gate.room("webhook:alive") == 2
    clock.now += 60
    assert gate.state("webhook:dead") is BreakerState.HALF_OPEN
    assert gate.limits().room == {"webhook:dead": 1}  # one probe
    gate.started("webhook:dead")
    assert gate.limits().blocked == {"webhook:dead"}
    assert gate.finished("webhook:dead", OK) is False
    assert gate.state("webhook:dead") is BreakerState.CLOSED
    assert gate.breakers == {} and gate.in_flight == {}  # healthy receivers keep no state


def test_a_refused_url_neither_opens_nor_closes_the_breaker() -> None:
    clock = Clock()
    gate = ReceiverGate(per_receiver=1, failures_to_open=2, cooldown=10, clock=clock)
    gate.started("webhook:h")
    gate.finished("webhook:h", TIMEOUT)
    gate.started("webhook:h")
    gate.finished("webhook:h", Outcome(False, error="refused", permanent=True))
    assert gate.breaker("webhook:h").failures == 1
    gate.started("webhook:h")
    assert gate.finished("webhook:h", Outcome(False, status_code=500)) is True


def test_open_receivers_lists_only_open_breakers() -> None:
    clock = Clock()
    gate = ReceiverGate(per_receiver=2, failures_to_open=1, cooldown=10, clock=clock)
    for name in ("webhook:a", "webhook:b"):
        gate.started(name)
        gate.finished(name, TIMEOUT)
    gate.started("webhook:c")
    assert gate.open_receivers() == ["webhook:a", "webhook:b"]
    clock.now += 10  # half-open: a probe may start
    assert gate.open_receivers() == []


def test_after_a_failure_no_more_in_flight_than_it_takes_to_open() -> None:
    """Two slots, opens at 2: the first fails while the second still runs; a third may
    start only once the second proved the receiver alive, so a dead one gets exactly 2."""
    gate = ReceiverGate(per_receiver=2, failures_to_open=2, cooldown=60, clock=Clock())
    gate.started("webhook:h")
    gate.started("webhook:h")
    assert gate.finished("webhook:h", TIMEOUT) is False
    assert gate.room("webhook:h") == 0 and gate.limits().blocked == {"webhook:h"}
    assert gate.finished("webhook:h", OK) is False  # alive: both slots back
    assert gate.room("webhook:h") == 2
    gate.started("webhook:h")
    assert gate.finished("webhook:h", TIMEOUT) is False
    assert gate.limits().room == {"webhook:h": 1}  # one failure counted, none in flight
    gate.started("webhook:h")
    assert gate.finished("webhook:h", TIMEOUT) is True
    assert gate.room("webhook:h") == 0
