"""An adaptive concurrency limit: how many requests the workers can take before they queue.

A continuous-batching worker's throughput grows with the requests it runs, up
to its batch slots (or KV cache); past that, new requests wait in its queue and
only their time to first token grows. So TTFT shows the knee: the limit probes
upwards while TTFT stays near its unloaded value and backs off when it rises,
like TCP's congestion window:

- the limit is judged once per *window* (as many first tokens as the limit, at
  least ``min_window``; a whole response, with no first token to time, counts
  its latency per output token instead), on the window's median TTFT against ``baseline``, the
  lowest window median of the recent past (so a changed workload re-bases it);
- slow start doubles the limit after every good window in which the limit was
  actually reached, until the first congestion; then it grows by one per window;
- a window whose median passes ``tolerance x baseline`` multiplies the limit by
  ``backoff``; an overload answer (429, 503, a timeout) multiplies it by
  ``error_backoff`` at once, at most once per window.

``headroom`` (latency-friendly mode) keeps in flight only that fraction of the
limit found at the last congestion (the knee), so interactive traffic sharing
the workers finds free slots; every ``reprobe_s`` seconds the full limit is
tried again for a window, so the knee follows the fleet as it changes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LimitSettings:
    initial: int = 4
    min: int = 1
    max: int = 1024
    tolerance: float = 2.0  # a window's median TTFT above tolerance x baseline is congestion
    backoff: float = 0.8  # multiplier on congestion
    error_backoff: float = 0.5  # multiplier on 429, 503 or a timeout
    min_window: int = 4  # first tokens per judgement, at least
    history: int = 16  # windows whose medians the baseline is the lowest of
    headroom: float = 1.0  # fraction of the knee kept in flight (1.0: all of it)
    reprobe_s: float = 30.0  # with headroom < 1: how often the full limit is tried again

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.initial <= self.max:
            raise ValueError(f"need 1 <= min <= initial <= max, got {self.min}, {self.initial}, {self.max}")
        if not self.tolerance > 1.0:
            raise ValueError(f"tolerance={self.tolerance} is invalid: allowed a number above 1")
        for name in ("backoff", "error_backoff"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed a number between 0 and 1")
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom={self.headroom} is invalid: allowed a fraction in (0, 1]")


class AdaptiveLimit:
    """The number of requests to keep in flight, learned from TTFT and overload answers."""

    def __init__(self, settings: LimitSettings | None = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings or LimitSettings()
        self._clock = clock
        self._limit = float(self.settings.initial)
        self._slow_start = True
        self.knee: float | None = None  # the limit judged sustainable at the last congestion
        self._window: list[float] = []
        self._window_saturated = False
        self._window_errored = False
        self._medians: deque[float] = deque(maxlen=self.settings.history)
        self._probe_until = 0.0
        self._last_probe = clock()
        self.congestions = 0  # windows judged congested, overload answers included

    @property
    def baseline(self) -> float | None:
        return min(self._medians) if self._medians else None

    @property
    def limit(self) -> int:
        """Requests to keep in flight now."""
        full = int(max(self.settings.min, min(self.settings.max, math.floor(self._limit))))
        if self.settings.headroom >= 1.0 or self.knee is None or self._probing():
            return full
        return max(self.settings.min, min(full, math.floor(self.knee * self.settings.headroom)))

    def note_in_flight(self, in_flight: int) -> None:
        """Called as each request is sent, with the requests then in flight (it included)."""
        if in_flight >= self.limit:
            self._window_saturated = True

    def on_latency(self, seconds: float) -> None:
        """A request's TTFT (streams), or its latency per output token (whole responses)."""
        self._window.append(seconds)
        if len(self._window) >= max(self.settings.min_window, self.limit):
            self._judge()

    def on_overload(self) -> None:
        """A 429, a 503 or a timeout: too much in flight, whatever TTFT says."""
        if self._window_errored:
            return
        self._window_errored = True
        self._congested(self.settings.error_backoff)

    def _judge(self) -> None:
        median = statistics.median(self._window)
        baseline = self.baseline
        self._medians.append(median)
        congested = baseline is not None and median > self.settings.tolerance * baseline
        if congested and not self._window_errored:
            self._congested(self.settings.backoff)
        elif not congested and self._window_saturated and not self._holding():
            self._limit = self._limit * 2 if self._slow_start else self._limit + 1
            self._limit = min(self._limit, float(self.settings.max))
            if self.knee is not None:
                self.knee = max(self.knee, self._limit)  # a probe went further without trouble
        self._window = []
        self._window_saturated = False
        self._window_errored = False
        self._maybe_reprobe()

    def _congested(self, factor: float) -> None:
        self.congestions += 1
        self._slow_start = False
        self._limit = max(float(self.settings.min), self._limit * factor)
        self.knee = self._limit
        self._probe_until = 0.0

    def _probing(self) -> bool:
        return self._clock() < self._probe_until

    def _holding(self) -> bool:
        """Latency-friendly mode between probes: stay at the headroom, do not grow."""
        return self.settings.headroom < 1.0 and self.knee is not None and not self._probing()

    def _maybe_reprobe(self) -> None:
        if self.settings.headroom >= 1.0 or self.knee is None:
            return
        now = self._clock()
        if not self._probing() and now - self._last_probe >= self.settings.reprobe_s:
            self._last_probe = now
            self._limit = max(self._limit, self.knee)
            self._probe_until = now + max(1.0, self.settings.reprobe_s / 10)
