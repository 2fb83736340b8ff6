"""Where requests went and how they fared, per endpoint and per worker, seen from the client.

Workers are told apart by the ``x-tokenmill-worker`` header every tokenmill
worker (and a router in front of them) sends; servers without it count under
their endpoint's URL. ``imbalance`` is max / mean of requests (and of tokens)
over workers: 1.0 is an even spread.

The monitor also watches the client itself, because the cheapest GPU-hour lost
is the one a slow client wastes: event-loop lag (a timer that should fire every
``tick_s`` and fires late means the loop is too busy to send or read on time),
and the share of time the client had free slots but nothing queued to fill them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

LAG_WARN_S = 0.05  # loop lag p99 above this: the client is the bottleneck
STARVED_MIN_TICKS = 50  # watch at least this long (x tick_s) before judging the queue
_SAMPLES = 4096  # latency samples kept per endpoint or worker


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    latency: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))


@dataclass(frozen=True, slots=True)
class TargetSummary:
    """One endpoint or worker. Latencies in seconds over its recent requests (None: none yet)."""

    name: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    ttft_p50: float | None
    ttft_p99: float | None
    latency_p50: float | None
    latency_p99: float | None


@dataclass(frozen=True, slots=True)
class MonitorReport:
    endpoints: list[TargetSummary]
    workers: list[TargetSummary]
    request_imbalance: float | None  # max / mean requests over workers
    token_imbalance: float | None  # max / mean completion tokens over workers
    errors_by_kind: dict[str, int]
    loop_lag_p99_s: float | None
    starved_fraction: float | None  # share of ticks with free slots and nothing queued
    concurrency_limit: int
    warnings: list[str]

    def table(self) -> str:
        """A plain-text table of the workers (endpoints when no worker header was seen), and a
        ``(no answer)`` row for requests no worker answered, so the rows add up to every request."""
        rows = self.workers or self.endpoints
        lines = [
            f"{'worker':<28} {'requests':>9} {'errors':>7} {'out tokens':>11} "
            f"{'TTFT p50 ms':>12} {'TTFT p99 ms':>12}"
        ]
        for r in rows:
            lines.append(
                f"{r.name[:28]:<28} {r.requests:>9} {r.errors:>7} {r.completion_tokens:>11} "
                f"{_ms(r.ttft_p50):>12} {_ms(r.ttft_p99):>12}"
            )
        unanswered = sum(e.requests for e in self.endpoints) - sum(w.requests for w in self.workers)
        if self.workers and unanswered:
            errors = sum(e.errors for e in self.endpoints) - sum(w.errors for w in self.workers)
            lines.append(f"{'(no answer)':<28} {unanswered:>9} {errors:>7} {0:>11} {'-':>12} {'-':>12}")
        if self.request_imbalance is not None:
            lines.append(
                f"imbalance (max/mean): requests {self.request_imbalance:.2f}, "
                f"tokens {self.token_imbalance or 0:.2f}"
            )
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


class Monitor:
    def __init__(self, tick_s: float = 0.1):
        self.tick_s = tick_s
        self._endpoints: dict[str, _Counts] = {}
        self._workers: dict[str, _Counts] = {}
        self._errors: Counter[str] = Counter()
        self._lags: deque[float] = deque(maxlen=600)
        self._ticks = 0
        self._starved_ticks = 0
        self._backlogged_ticks = 0  # ticks with requests waiting for a slot
        self._task: asyncio.Task[None] | None = None

    def record(
        self,
        endpoint: str,
        worker: str | None,
        *,
        ttft: float | None,
        latency: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
    ) -> None:
        """One request ended (``error``: its kind, e.g. ``rate_limited``, ``timeout``). ``worker``
        is None when no response came back: the request counts for its endpoint only."""
        targets = [self._endpoints.setdefault(endpoint, _Counts())]
        if worker is not None:
            targets.append(self._workers.setdefault(worker, _Counts()))
        for counts in targets:
            counts.requests += 1
            counts.prompt_tokens += prompt_tokens
            counts.completion_tokens += completion_tokens
            counts.latency.append(latency)
            if ttft is not None:
                counts.ttft.append(ttft)
            if error is not None:
                counts.errors += 1
        if error is not None:
            self._errors[error] += 1

    def start(self, queue_state: Callable[[], tuple[bool, bool]]) -> None:
        """Watch loop lag, and through ``queue_state()`` (starved, backlogged) the client's queue,
        from inside the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(queue_state))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self, queue_state: Callable[[], tuple[bool, bool]]) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self._lags.append(max(0.0, time.perf_counter() - before - self.tick_s))
            self._ticks += 1
            starved, backlogged = queue_state()
            self._starved_ticks += starved
            self._backlogged_ticks += backlogged

    def report(self, concurrency_limit: int) -> MonitorReport:
        workers = [_summary(name, c) for name, c in sorted(self._workers.items())]
        endpoints = [_summary(name, c) for name, c in sorted(self._endpoints.items())]
        lag = _quantile(list(self._lags), 0.99)
        warnings = []
        starved = self._starved_ticks / self._ticks if self._ticks else None
        backlogged = self._backlogged_ticks / self._ticks if self._ticks else 0.0
        if starved is not None and self._ticks >= STARVED_MIN_TICKS and starved > 0.25 and backlogged > 0.1:
            # Bursts that queue, with idle slots between them: what feeds the client is too slow.
            warnings.append(
                f"the client had free slots and nothing to send {starved:.0%} of the time, while at other "
                "times requests queued: what produces the requests is the bottleneck (submit more at once)"
            )
        if lag is not None and lag > LAG_WARN_S:
            warnings.append(
                f"event loop lag p99 {lag * 1000:.0f} ms: the client is too busy to send and read on time "
                "(move other work off this loop, or use more client processes)"
            )
        return MonitorReport(
            endpoints,
            workers,
            _imbalance([w.requests for w in workers]),
            _imbalance([w.completion_tokens for w in workers]),
            dict(self._errors),
            lag,
            starved,
            concurrency_limit,
            warnings,
        )


def _summary(name: str, c: _Counts) -> TargetSummary:
    ttft, latency = list(c.ttft), list(c.latency)
    return TargetSummary(
        name,
        c.requests,
        c.errors,
        c.prompt_tokens,
        c.completion_tokens,
        _quantile(ttft, 0.5),
        _quantile(ttft, 0.99),
        _quantile(latency, 0.5),
        _quantile(latency, 0.99),
    )


def _imbalance(values: list[int]) -> float | None:
    if len(values) < 1 or sum(values) == 0:
        return None
    return max(values) / (sum(values) / len(values))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"
