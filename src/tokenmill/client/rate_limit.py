"""Client-side quotas: requests per minute and tokens per minute, paced rather than burst.

Each quota is a generic cell rate algorithm (GCRA): a theoretical arrival time
``tat`` moves forward by ``cost / rate`` for every admitted request. By
default a request may go while the requests not yet paid for, it included, fit
in a minute's quota (the quota as a token bucket: a minute's worth may go at
once); with ``no_burst=True`` only once ``tat <= now``, which spaces requests
evenly so a worker never sees the minute's quota land in its first second.

A request's token cost is its prompt estimate plus ``max_tokens``, reserved
when it is sent; ``settle`` hands back what it did not use, as the gateway does.
A request that costs more than a minute's token quota could never fit it: it is
refused at once (``QuotaExceeded``) rather than reserved, since its wait (and
that of every request queued behind it) would be longer than a minute, up to years.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


class QuotaExceeded(ValueError):
    """A request larger than a whole minute's ``tokens_per_minute``: it can never be sent."""


@dataclass(frozen=True, slots=True)
class Quota:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    no_burst: bool = False

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(
                    f"{name}={value!r} is invalid: allowed a positive number, or None for no limit"
                )


class _Cell:
    """One GCRA meter: ``rate`` units per second, ``burst`` seconds of slack."""

    def __init__(self, per_minute: float, no_burst: bool, clock: Callable[[], float]):
        self.rate = per_minute / 60.0
        self.no_burst = no_burst
        self._clock = clock
        self._tat = clock()

    def delay(self, cost: float) -> float:
        """Seconds until ``cost`` units may go (0: now)."""
        if self.no_burst:  # the previous request's share of the pace has passed
            return max(0.0, self._tat - self._clock())
        # this one fits, with all the others not yet paid for, in a minute's quota
        return max(0.0, self._tat + cost / self.rate - 60.0 - self._clock())

    def take(self, cost: float) -> None:
        self._tat = max(self._tat, self._clock()) + cost / self.rate

    def give_back(self, cost: float) -> None:
        # Never behind now: unused tokens refund pace, they do not buy a later burst.
        self._tat = max(self._clock(), self._tat - cost / self.rate)


class RateLimiter:
    """Waits until a request fits both quotas; requests leave in the order they asked."""

    def __init__(self, quota: Quota, clock: Callable[[], float] = time.monotonic):
        self.quota = quota
        self._requests = (
            _Cell(quota.requests_per_minute, quota.no_burst, clock) if quota.requests_per_minute else None
        )
        self._tokens = (
            _Cell(quota.tokens_per_minute, quota.no_burst, clock) if quota.tokens_per_minute else None
        )
        self._lock = asyncio.Lock()  # FIFO: a large request is not overtaken forever by small ones

    @property
    def active(self) -> bool:
        return self._requests is not None or self._tokens is not None

    def delay(self, tokens: int) -> float:
        """Seconds until a request of ``tokens`` may go."""
        waits = [0.0]
        if self._requests is not None:
            waits.append(self._requests.delay(1))
        if self._tokens is not None:
            waits.append(self._tokens.delay(tokens))
        return max(waits)

    def check(self, tokens: int) -> None:
        """Raise ``QuotaExceeded`` if a request of ``tokens`` is larger than a minute's token quota."""
        tpm = self.quota.tokens_per_minute
        if self._tokens is not None and tpm is not None and tokens > tpm:
            raise QuotaExceeded(
                f"this request may use {tokens} tokens (prompt estimate + max_tokens × n), more than "
                f"tokens_per_minute={tpm:g}: it could never be sent; lower max_tokens or raise "
                "tokens_per_minute"
            )

    async def acquire(self, tokens: int) -> None:
        """Wait for room, then reserve one request and ``tokens`` tokens (``QuotaExceeded``, at once,
        for more tokens than a minute's quota)."""
        if not self.active:
            return
        self.check(tokens)
        async with self._lock:
            while (wait := self.delay(tokens)) > 0:
                await asyncio.sleep(wait)
            if self._requests is not None:
                self._requests.take(1)
            if self._tokens is not None:
                self._tokens.take(tokens)

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved ``reserved`` tokens used ``used``: refund or charge the difference."""
        if self._tokens is None or used == reserved:
            return
        if used < reserved:
            self._tokens.give_back(reserved - used)
        else:
            self._tokens.take(used - reserved)
