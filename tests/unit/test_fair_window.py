"""The shared in-flight window and the prefix order (pure logic, no engine)."""

from __future__ import annotations

import asyncio
import math

import pytest

from vllm_batch.batches.policy import deadline_factor, priority_weight
from vllm_batch.pipeline.dispatch import prefix_order, prompt_pieces
from vllm_batch.pipeline.window import FairWindow, Lane
from vllm_batch.worker.loop import Pace


async def grants(window: FairWindow, lanes: dict[str, Lane], count: int) -> list[str]:
    """Which lane gets each of ``count`` slots when every lane always wants one more.

    A blocker holds the (one-slot) window until every lane waits, so the first grant is
    already a choice.
    """
    order: list[str] = []
    names = {id(lane): name for name, lane in lanes.items()}
    blocker = window.open_lane(weight=1e-6)
    assert await window.acquire(blocker)

    async def request(lane: Lane) -> None:
        await asyncio.sleep(0)
        window.release(lane)

    async def want(lane: Lane) -> None:  # as a dispatcher: always waiting for the next slot
        requests = []
        while len(order) < count:
            if not await window.acquire(lane):
                break
            order.append(names[id(lane)])
            requests.append(asyncio.create_task(request(lane)))
        await asyncio.gather(*requests)

    tasks = [asyncio.create_task(want(lane)) for lane in lanes.values()]
    await asyncio.sleep(0.01)
    window.close_lane(blocker)
    window.release(blocker)
    while len(order) < count:
        await asyncio.sleep(0)
    for lane in lanes.values():
        window.close_lane(lane)
    await asyncio.gather(*tasks)
    return order[:count]


def test_priority_weights() -> None:
    assert [priority_weight(p) for p in (0, 1, 3)] == [1.0, 2.0, 4.0]
    assert priority_weight(-1) == 0.5 and priority_weight(-3) == 0.25


def test_deadline_factor_grows_as_the_deadline_nears() -> None:
    assert deadline_factor(2 * 86400) == 1.0 and deadline_factor(86400) == 1.0
    assert deadline_factor(3600) == 24.0
    assert deadline_factor(30) == deadline_factor(-100) == 1440.0


async def test_equal_lanes_take_turns() -> None:
    window = FairWindow(1)
    lanes = {"a": window.open_lane(), "b": window.open_lane(), "c": window.open_lane()}
    order = await grants(window, lanes, 9)
    assert order == ["a", "b", "c"] * 3


async def test_shares_follow_the_weights() -> None:
    window = FairWindow(1)
    lanes = {"heavy": window.open_lane(weight=3.0), "light": window.open_lane(weight=1.0)}
    order = await grants(window, lanes, 40)
    assert order.count("heavy") == 30 and order.count("light") == 10


async def test_earliest_deadline_wins_among_equals_and_urgent_goes_first() -> None:
    window = FairWindow(1)
    lanes = {
        "late": window.open_lane(deadline=1000.0),
        "soon": window.open_lane(deadline=10.0),
    }
    order = await grants(window, lanes, 4)
    assert order == ["soon", "late", "soon", "late"]
    window = FairWindow(1)
    lanes = {
        "heavy": window.open_lane(weight=10.0),
        "urgent": window.open_lane(urgent=True, deadline=50.0),
    }
    order = await grants(window, lanes, 5)
    assert order == ["urgent"] * 5


async def test_a_new_lane_neither_waits_for_history_nor_bursts() -> None:
    window = FairWindow(1)
    old = window.open_lane()
    for _ in range(50):  # the old lane ran alone for a while
        assert await window.acquire(old)
        window.release(old)
    lanes = {"old": old, "new": window.open_lane()}
    order = await grants(window, lanes, 10)
    assert order.count("new") == 5
    # A lane that stopped asking (its lines all sent) does not set the pace.
    window = FairWindow(1)
    stale, busy = window.open_lane(), window.open_lane()
    for _ in range(30):
        assert await window.acquire(busy)
        window.release(busy)
    assert await window.acquire(busy)  # holds the one slot...
    waiting = asyncio.create_task(window.acquire(busy))  # ...and keeps asking; stale does not
    await asyncio.sleep(0)
    assert stale.vtime == 0 and window.open_lane().vtime == busy.vtime == 31.0
    waiting.cancel()


async def test_window_bounds_in_flight_and_closing_frees_a_waiter() -> None:
    window = FairWindow(2)
    lane = window.open_lane()
    assert await window.acquire(lane) and await window.acquire(lane)
    assert window.in_flight == 2 and lane.in_flight == 2
    waiting = asyncio.create_task(window.acquire(lane))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    window.close_lane(lane)
    assert await waiting is False
    window.release(lane)
    window.release(lane)
    assert window.in_flight == 0
    assert await window.acquire(lane) is False  # closed for good


async def test_resize_and_cancelled_waiters_lose_no_slot() -> None:
    window = FairWindow(1)
    a, b = window.open_lane(), window.open_lane()
    assert await window.acquire(a)
    waiting = asyncio.create_task(window.acquire(b))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    window.release(a)
    assert window.in_flight == 0
    window.resize(3)
    assert all([await window.acquire(a) for _ in range(3)])
    assert window.size == 3 and window.in_flight == 3


def test_window_counts_remaining_lines() -> None:
    window = FairWindow(4)
    window.open_lane(remaining=3)
    lane = window.open_lane(remaining=5)
    assert window.remaining == 8
    window.close_lane(lane)
    assert window.remaining == 3 and math.isinf(lane.deadline)


def chat(*messages: tuple[str, str]) -> dict[str, object]:
    return {"body": {"messages": [{"role": r, "content": c} for r, c in messages]}}


def test_prefix_order_groups_documents_inside_one_message() -> None:
    docs = {name: f"Document {name}: " + " ".join([f"{name}-word"] * 150) for name in "ABC"}
    lines = []
    for question in range(3):
        for name in "CAB":  # shuffled: every document's questions apart
            lines.append(
                chat(("system", "Answer briefly."), ("user", f"{docs[name]}\nQ{question}?"))
            )
    order = prefix_order([prompt_pieces(line) for line in lines])
    grouped = [str(lines[i]["body"]["messages"][1]["content"])[9] for i in order]  # type: ignore[index]
    assert grouped == list("CCCAAABBB")  # by document, in order of first appearance
    assert order[0] == 0


def test_prefix_order_nests_system_prompts_then_documents() -> None:
    long_a, long_b = "a" * 400, "b" * 400
    lines = [
        chat(("system", "S1"), ("user", long_b + "1")),
        chat(("system", "S2"), ("user", long_a + "2")),
        chat(("system", "S1"), ("user", long_a + "3")),
        chat(("system", "S2"), ("user", long_a + "4")),
        chat(("system", "S1"), ("user", long_b + "5")),
    ]
    order = prefix_order([prompt_pieces(line) for line in lines])
    assert order == [0, 4, 2, 1, 3]


def test_prompt_pieces_of_other_shapes() -> None:
    assert prompt_pieces({"body": {"prompt": "x" * 300}}) == ["x" * 128, "x" * 128, "x" * 44]
    parts = {"body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}}
    assert prompt_pieces(parts) == ["user\x00hi"]
    assert prompt_pieces({"body": []}) == [] and prompt_pieces({}) == []


def test_pace_measures_seconds_per_line() -> None:
    now = [0.0]
    pace = Pace(clock=lambda: now[0])
    assert pace.seconds_per_line() == 0.0
    for _ in range(10):
        now[0] += 1.0
        pace.add(4)
    assert pace.seconds_per_line() == pytest.approx(0.25, rel=0.01)
