"""A semaphore whose size moves: requests wait here, first come first served, for a free slot."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class ConcurrencyGate:
    """At most ``limit()`` holders at once; ``limit`` is read afresh at every acquire and release,
    so an adaptive limit that shrinks lets no one new in until enough holders leave."""

    def __init__(self, limit: Callable[[], int]):
        self._limit = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if not self._waiters and self.in_flight < self._limit():
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # granted just as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self._release_slot()

    def wake(self) -> None:
        """Let waiters in up to the limit (after the limit grew)."""
        while self._waiters and self.in_flight < self._limit():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _release_slot(self) -> None:
        self.in_flight -= 1
        self.wake()
