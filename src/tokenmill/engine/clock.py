"""The engine's notion of time: the real clock, or a virtual one for simulations.

Timestamps on requests come from ``now()``; a ``SimulatedRunner`` spends its
step time with ``sleep()``. With a ``VirtualClock`` a fleet of simulated
workers runs as fast as Python can step them, with no threads or sockets.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class VirtualClock:
    """Time that only moves when someone sleeps or sets it."""

    def __init__(self, start: float = 0.0):
        self._now = start

    def now(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    def advance_to(self, t: float) -> None:
        self._now = max(self._now, t)
