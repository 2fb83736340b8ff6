"""Each worker's prefill speed, measured from its own ``/metrics`` (for ``prefix`` and ``kv``).

The cache-aware policies estimate a request's time to first token in seconds,
so a slower worker (another GPU, a bigger batch of decodes) is charged for it.
A tokenmill worker exports, over all engine steps, the tokens computed and
the wall time spent (``tokenmill_step_tokens`` and
``tokenmill_step_duration_seconds`` histograms: their ``_count`` and ``_sum``).
Between two scrapes a window holds ``n`` steps, ``T`` tokens and ``D``
seconds; a step costs about ``a + b * tokens``, so ``D = a n + b T``. Windows
of different mixes (decode-heavy, prefill-heavy) pin down both by least
squares over the last ``WINDOWS`` windows; ``b`` is the seconds per prefill
token the policies charge. While the windows cannot tell ``a`` from ``b`` (all
of one mix), ``b`` is taken as ``D / T`` of them all, which errs slow.

The same scrape reads the worker's prefix-cache counters (tokenmill's or
vLLM's names), so the router reports measured cache hits beside predicted ones.
Workers that export none of this keep the fleet's typical value.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOWS = 30  # scrape windows in the fit
MIN_WINDOW_TOKENS = 256  # a window with less work says little
DEFAULT_SECONDS_PER_TOKEN = 1e-4  # 10k prefill tokens/s, until a worker is measured

_SERIES = {
    "tokenmill_step_tokens_count": "steps",
    "tokenmill_step_tokens_sum": "tokens",
    "tokenmill_step_duration_seconds_sum": "seconds",
    "tokenmill_prefix_cache_hits_total": "cache_hits",
    "tokenmill_prefix_cache_queries_total": "cache_queries",
    "vllm:prefix_cache_hits_total": "cache_hits",
    "vllm:prefix_cache_queries_total": "cache_queries",
}


@dataclass(frozen=True)
class WorkerCounters:
    """The cumulative counters one scrape of a worker's /metrics gave (summed over label sets)."""

    steps: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0
    cache_hits: float | None = None
    cache_queries: float | None = None


def parse_counters(text: str) -> WorkerCounters:
    """The series the router uses from Prometheus text; the rest is skipped."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        field = _SERIES.get(line[:name_end]) if name_end > 0 else None
        if field is None:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        found[field] = found.get(field, 0.0) + value
    return WorkerCounters(
        steps=found.get("steps", 0.0),
        tokens=found.get("tokens", 0.0),
        seconds=found.get("seconds", 0.0),
        cache_hits=found.get("cache_hits"),
        cache_queries=found.get("cache_queries"),
    )


class StepCostFit:
    """``a + b * tokens`` seconds per step, fitted to the windows between scrapes."""

    def __init__(self) -> None:
        self._last: WorkerCounters | None = None
        self._windows: deque[tuple[float, float, float]] = deque(maxlen=WINDOWS)  # (n, T, D)
        self.seconds_per_token: float | None = None  # b, once measured
        self.seconds_per_step: float | None = None  # a

    def observe(self, counters: WorkerCounters) -> None:
        last, self._last = self._last, counters
        if last is None:
            return
        n, t, d = counters.steps - last.steps, counters.tokens - last.tokens, counters.seconds - last.seconds
        if n < 0 or t < 0 or d < 0:  # the worker restarted: its counters began again
            self._windows.clear()
            return
        if t >= MIN_WINDOW_TOKENS and d > 0:
            self._windows.append((n, t, d))
            self._fit()

    def reset(self) -> None:
        self._last = None
        self._windows.clear()

    def _fit(self) -> None:
        snn = snt = stt = snd = std = 0.0
        for n, t, d in self._windows:
            snn += n * n
            snt += n * t
            stt += t * t
            snd += n * d
            std += t * d
        det = snn * stt - snt * snt
        if det > 1e-6 * snn * stt:  # the windows differ enough in mix to separate a from b
            a = (snd * stt - std * snt) / det
            b = (snn * std - snt * snd) / det
            if a >= 0 and b > 0:
                self.seconds_per_step, self.seconds_per_token = a, b
                return
        total_t = sum(t for _, t, _ in self._windows)
        total_d = sum(d for _, _, d in self._windows)
        self.seconds_per_step, self.seconds_per_token = 0.0, total_d / total_t
