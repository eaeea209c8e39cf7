"""The engine's in-flight window, shared fairly by every chunk a worker holds.

Each chunk (or a whole ``vllm-batch run`` file) is a ``Lane``. When a slot frees up it goes
to the waiting lane with the lowest key:

1. an ``urgent`` lane (its batch may miss its deadline) before any other;
2. the lowest virtual time: each grant adds ``1 / weight``, so a lane of weight 2 gets two
   slots for every one of a weight-1 lane (weighted round robin, as in stride scheduling);
   a new lane starts at the lowest virtual time of the lanes already open, so it neither
   waits behind their history nor gets a burst to catch up;
3. the higher weight, then the earliest ``deadline`` (earliest deadline first among equal
   priorities);
4. the oldest lane.

Database-free: the worker sets weight, deadline and urgency from the batch rows, by the
scheduling policy (``batches/policy.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass, field


@dataclass(eq=False)
class Lane:
    """One holder's claim on the window; ``remaining`` counts its lines not yet finished."""

    weight: float = 1.0
    deadline: float = math.inf
    urgent: bool = False
    remaining: int = 0
    vtime: float = 0.0
    seq: int = 0
    closed: bool = False
    in_flight: int = 0
    waiter: asyncio.Future[bool] | None = field(default=None, repr=False)

    def key(self) -> tuple[bool, float, float, float, int]:
        return (not self.urgent, self.vtime, -self.weight, self.deadline, self.seq)


class FairWindow:
    """At most ``size`` requests in flight, handed out to lanes in ``Lane.key`` order."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the in-flight window needs at least one slot")
        self._size = size
        self.in_flight = 0
        self._lanes: list[Lane] = []
        self._seq = itertools.count()

    @property
    def size(self) -> int:
        return self._size

    def resize(self, size: int) -> None:
        """Change the window (after an out-of-memory back-off); in-flight work is kept."""
        self._size = max(1, size)
        self._grant()

    @property
    def lanes(self) -> list[Lane]:
        return list(self._lanes)

    @property
    def remaining(self) -> int:
        """Lines held by every open lane that have not finished yet."""
        return sum(lane.remaining for lane in self._lanes)

    def open_lane(
        self,
        *,
        weight: float = 1.0,
        deadline: float = math.inf,
        urgent: bool = False,
        remaining: int = 0,
    ) -> Lane:
        # Level with the lanes competing now (not with one that stopped asking early, which
        # would give the new lane a long burst).
        start = min(
            (lane.vtime for lane in self._waiting()),
            default=max((lane.vtime for lane in self._lanes), default=0.0),
        )
        lane = Lane(
            weight=max(weight, 1e-9),
            deadline=deadline,
            urgent=urgent,
            remaining=remaining,
            vtime=start,
            seq=next(self._seq),
        )
        self._lanes.append(lane)
        return lane

    def close_lane(self, lane: Lane) -> None:
        """No more grants for ``lane``; a pending ``acquire`` returns False."""
        lane.closed = True
        if lane.waiter is not None and not lane.waiter.done():
            lane.waiter.set_result(False)
        lane.waiter = None
        if lane in self._lanes:
            self._lanes.remove(lane)
        self._grant()

    async def acquire(self, lane: Lane) -> bool:
        """Wait for a slot for ``lane``; False if the lane was closed meanwhile."""
        if lane.closed:
            return False
        if lane.waiter is not None:
            raise RuntimeError("a lane waits for one slot at a time")
        if self.in_flight < self._size and not self._waiting():
            self._take(lane)  # a free slot and nobody else waiting: no choice to make
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        lane.waiter = waiter
        self._grant()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release(lane)  # granted just as we were cancelled: give it back
            raise
        finally:
            if lane.waiter is waiter:
                lane.waiter = None

    def release(self, lane: Lane) -> None:
        """A request of ``lane`` finished (or was abandoned): its slot goes to the next lane."""
        self.in_flight -= 1
        lane.in_flight -= 1
        self._grant()

    def _waiting(self) -> list[Lane]:
        return [lane for lane in self._lanes if lane.waiter is not None and not lane.waiter.done()]

    def _take(self, lane: Lane) -> None:
        lane.vtime += 1.0 / lane.weight
        self.in_flight += 1
        lane.in_flight += 1

    def _grant(self) -> None:
        while self.in_flight < self._size:
            waiting = self._waiting()
            if not waiting:
                return
            lane = min(waiting, key=Lane.key)
            self._take(lane)
            assert lane.waiter is not None
            lane.waiter.set_result(True)
