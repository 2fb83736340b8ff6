"""The gateway's admission queue: priority bands, fair shares between teams, bounded waits.

Workers take only so many requests at once (each reports its concurrency
limit: ``tokenmill_concurrency_limit`` in its /metrics, or the gateway's
default). While a pool has a free slot a request goes straight through; when
it has none, the request waits here:

- in the band of its priority, higher bands first. Aging keeps the lowest
  band moving: a band's standing rises by one for every ``aging_s`` seconds
  its oldest request has waited;
- within a band, teams share by weighted fair queuing on tokens (start-time
  fair queuing): each request gets a virtual start, the later of the band's
  virtual time and its team's last virtual finish, and a virtual finish of
  start + tokens / team weight; the smallest start goes first. A team that
  floods only lengthens its own queue: the others keep their share of slots
  in proportion to their weights, whatever the flood;
- (``fair: false`` makes a band first come, first served, for comparison);
- a request that outranks every waiting request and some running one may go
  past full, into ``overflow`` (a share of the slots): the worker's scheduler
  preempts a lower-priority request to seat it, so premium traffic neither
  waits for a slot to free nor needs slots held back for it;
- at most ``max_waiting`` requests wait, all bands together, and none waits
  longer than ``max_wait_s``: past either, 429 with ``Retry-After``. When the
  queue is full, a request that outranks the lowest waiting priority takes the
  place of the last of that band (which gets the 429); any other is refused.
  The bound is on the total, not per band: a client choosing a new priority
  for each request would otherwise get ``max_waiting`` more places each time.
  A band is dropped once nothing waits or runs in it, so priorities used once
  cost nothing later;
- a pool with no slot at all (no worker up, in it or to fall back on) has
  nothing to wait for: ``NoCapacity`` at once (the router's 503), and the
  requests waiting when its last worker goes get it too (``dispatch()``,
  called when the workers change), not a 429 after ``max_wait_s``.

The queue knows slots, not workers: the router still picks which worker of
the pool takes each admitted request.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The request cannot wait: the queue is full (or a request of higher priority took its
    place there), or it waited past ``max_wait_s``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoCapacity(Exception):
    """The pool has no slot at all (no worker of it, nor any to fall back on, is available): a
    request has nothing to wait for, so it is refused at once, as unavailable (503), not as a
    full queue (429), which would send its client to look at its team's limits."""


@dataclass(frozen=True)
class QueuePolicy:
    max_waiting: int = 1000  # all bands together
    max_wait_s: float = 30.0
    aging_s: float = 5.0  # a band's standing rises by one per this many seconds its oldest waits
    fair: bool = True  # weighted fair queuing between teams; False: first come, first served
    overflow: float = 0.125  # share of the slots a request may take past full, if it outranks what runs


@dataclass(order=True)
class _Ticket:
    start: float  # virtual start: the order within the band
    seq: int
    team: str = field(compare=False)
    priority: int = field(compare=False)
    tokens: int = field(compare=False)
    arrived: float = field(compare=False)
    charge: float = field(compare=False)  # what it added to its team's virtual finish
    future: asyncio.Future[None] = field(compare=False, repr=False)


@dataclass
class _Band:
    priority: int
    waiting: list[_Ticket] = field(default_factory=list)  # kept sorted by virtual start
    virtual_time: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)  # team -> its last virtual finish


class AdmissionQueue:
    """One per pool. ``capacity()`` gives the pool's slots now (its workers may come and go)."""

    def __init__(
        self,
        capacity: Callable[[], int],
        policy: QueuePolicy | None = None,
        weight: Callable[[str], float] = lambda team: 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.policy = policy or QueuePolicy()
        self.weight = weight
        self.clock = clock
        self.in_flight = 0
        self._running: dict[int, int] = {}  # priority -> requests in flight
        self._bands: dict[int, _Band] = {}  # only those with requests waiting or running
        self._waiting = 0  # in every band
        self._seq = itertools.count()
        self.admitted_by_team: dict[str, int] = {}
        self.refused = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    async def acquire(self, team: str, priority: int, tokens: int) -> None:
        """Wait for a slot; raises QueueFull to refuse, NoCapacity when the pool has no slot at
        all (now, or while it waits). Pair every return with ``release(priority)``."""
        if self._room_for(priority):
            self._admit(team, priority)
            return
        if self.capacity() == 0:
            raise NoCapacity("no worker is available")
        if self._waiting >= self.policy.max_waiting:
            self._make_room(priority)  # or raises QueueFull
        band = self._bands.get(priority)
        if band is None:
            band = self._bands[priority] = _Band(priority)
        if self.policy.fair:
            start = max(band.virtual_time, band.finish.get(team, 0.0))
            charge = tokens / max(self.weight(team), 1e-9)
            band.finish[team] = start + charge
        else:
            start, charge = float(next(self._seq)), 0.0  # arrival order
        future = asyncio.get_running_loop().create_future()
        ticket = _Ticket(start, next(self._seq), team, priority, tokens, self.clock(), charge, future)
        _insort(band.waiting, ticket)
        self._waiting += 1
        self._dispatch()  # a slot may have freed while nobody looked
        try:
            await asyncio.wait_for(asyncio.shield(ticket.future), self.policy.max_wait_s)
        except TimeoutError:
            if ticket.future.done():  # admitted (or pushed out) at the last moment
                ticket.future.result()  # (raises QueueFull if pushed out, NoCapacity if refused)
                return
            self._drop(band, ticket)
            self.refused += 1
            raise QueueFull(
                f"waited {self.policy.max_wait_s:g} s in the priority {priority} queue", self._retry_after()
            ) from None
        except asyncio.CancelledError:  # the client left while waiting
            future = ticket.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(priority)  # admitted already: give the slot back
            else:
                self._drop(band, ticket)
            raise

    def outranks_running(self, priority: int) -> bool:
        """Whether requests of a lower priority are in flight (admitted at ``priority``, a request
        will be seated by its worker before any of theirs that wait there)."""
        return bool(self._running) and priority > min(self._running)

    def release(self, priority: int) -> None:
        """The request admitted at ``priority`` ended."""
        self.in_flight -= 1
        left = self._running.get(priority, 0) - 1
        if left > 0:
            self._running[priority] = left
        else:
            self._running.pop(priority, None)
            self._forget_if_idle(priority)
        self._dispatch()

    def _room_for(self, priority: int) -> bool:
        """A free slot with nobody waiting; or, past full, a request that outranks every waiting
        one and some running one: it may take an overflow slot, and the worker's scheduler makes
        room for it by preempting a lower-priority request (so premium traffic does not wait for
        a slot to free, and no slot is held back for it)."""
        capacity = self.capacity()
        if self.in_flight < capacity and not self._waiting:
            return True
        waiting = [b.priority for b in self._bands.values() if b.waiting]
        outranks = (
            (not waiting or priority > max(waiting)) and self._running and priority > min(self._running)
        )
        return bool(outranks) and self.in_flight < capacity + math.ceil(capacity * self.policy.overflow)

    def _admit(self, team: str, priority: int) -> None:
        self.in_flight += 1
        self._running[priority] = self._running.get(priority, 0) + 1
        self.admitted_by_team[team] = self.admitted_by_team.get(team, 0) + 1

    def dispatch(self) -> None:
        """Admit what the pool's capacity now allows, or refuse everything waiting with NoCapacity
        if it has none left: called when the workers change (a worker that joins seats waiting
        requests at once; when the last one goes, they do not wait out ``max_wait_s`` for it)."""
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._waiting:  # (every release asks: nearly always nothing to seat)
            return
        capacity = self.capacity()
        if capacity == 0:
            self._refuse_waiting()
            return
        while self.in_flight < capacity:
            band = self._next_band()
            if band is None:
                return
            ticket = band.waiting.pop(0)
            self._waiting -= 1
            band.virtual_time = max(band.virtual_time, ticket.start)
            self._admit(ticket.team, ticket.priority)
            ticket.future.set_result(None)

    def _next_band(self) -> _Band | None:
        now, best, standing = self.clock(), None, -math.inf
        for band in self._bands.values():
            if not band.waiting:
                continue
            oldest = min(t.arrived for t in band.waiting)
            s = band.priority + (now - oldest) / self.policy.aging_s
            if s > standing:
                best, standing = band, s
        return best

    def _make_room(self, priority: int) -> None:
        """The queue is full: push out the last request of the lowest band waiting if ``priority``
        outranks it (it gets the 429 instead), else refuse this request."""
        lowest = min((b for b in self._bands.values() if b.waiting), key=lambda b: b.priority, default=None)
        if lowest is None or priority <= lowest.priority:
            self.refused += 1
            raise QueueFull(
                f"the admission queue is full ({self.policy.max_waiting} waiting, none of a priority "
                f"below {priority})",
                self._retry_after(),
            )
        ticket = lowest.waiting[-1]  # the one it would admit last
        self._drop(lowest, ticket)
        self.refused += 1
        ticket.future.set_exception(
            QueueFull(
                f"the admission queue is full ({self.policy.max_waiting} waiting) and a request of "
                f"priority {priority} took the place of this priority {ticket.priority} one",
                self._retry_after(),
            )
        )

    def _refuse_waiting(self) -> None:
        for band in list(self._bands.values()):
            for ticket in list(band.waiting):
                self._drop(band, ticket)
                ticket.future.set_exception(NoCapacity("the last worker went away while it waited"))

    def _drop(self, band: _Band, ticket: _Ticket) -> None:
        """``ticket`` leaves unserved (its client left, it waited too long, it was pushed out)."""
        if ticket in band.waiting:
            band.waiting.remove(ticket)
            self._waiting -= 1
            # It was never served: its team's virtual finish gives back what it charged, else a
            # team whose requests are given up in a busy band would fall behind the others for it.
            finish = band.finish.get(ticket.team)
            if finish is not None and ticket.charge:
                if finish - ticket.charge > band.virtual_time:
                    band.finish[ticket.team] = finish - ticket.charge
                else:  # nothing owed: the next one starts at the band's virtual time anyway
                    del band.finish[ticket.team]
        if not band.waiting:
            self._forget_if_idle(band.priority)

    def _forget_if_idle(self, priority: int) -> None:
        """Drop the band of ``priority`` if nothing waits or runs in it: its fair-queuing state only
        orders requests that wait together, and bands kept for every priority ever used would make
        every admission walk them all."""
        band = self._bands.get(priority)
        if band is not None and not band.waiting and priority not in self._running:
            del self._bands[priority]

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.policy.max_wait_s / 4))


def _insort(waiting: list[_Ticket], ticket: _Ticket) -> None:
    lo, hi = 0, len(waiting)
    while lo < hi:
        mid = (lo + hi) // 2
        if waiting[mid] < ticket:
            lo = mid + 1
        else:
            hi = mid
    waiting.insert(lo, ticket)
