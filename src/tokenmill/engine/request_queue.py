"""The waiting queue: higher priority first, then first come, first served.

A request keeps the place it got on arrival: when it is preempted and comes
back, it goes ahead of everything of its priority that arrived after it. With
``use_priority=False`` (the ``fcfs`` policy) priorities are ignored: arrival
order only.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from tokenmill.engine.request import Request


class WaitingQueue:
    def __init__(self, use_priority: bool = True) -> None:
        self.use_priority = use_priority
        self._keys: list[tuple[int, int]] = []  # (-priority, arrival order), sorted
        self._requests: list[Request] = []
        self._arrival: dict[str, int] = {}
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        order = self._arrival.setdefault(request.request_id, next(self._counter))
        key = (-request.priority if self.use_priority else 0, order)
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._requests.insert(i, request)

    @property
    def arrival(self) -> dict[str, int]:
        """Arrival order of every request seen and not yet finished (running ones too)."""
        return self._arrival

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        """Take the first request; it keeps its arrival order for a later return."""
        self._keys.pop(0)
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        """Drop a request for good (finished or aborted)."""
        i = self._requests.index(request)
        del self._keys[i], self._requests[i]
        self._arrival.pop(request.request_id, None)

    def forget(self, request_id: str) -> None:
        """Drop the arrival record of a request that left through running."""
        self._arrival.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)
