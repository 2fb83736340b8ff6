"""Each worker's step costs, measured from its own ``/metrics`` (for ``prefix`` and ``kv``).

The cache-aware policies estimate, in seconds, when a request would finish on
each worker, so a slower worker (another GPU, a bigger model, a longer batch
of decodes) is charged for it. A tokenmill worker exports, over all engine
steps, the steps taken, the tokens computed, the context tokens its decodes
attended to and the wall time spent (``tokenmill_step_tokens`` ``_count`` and
``_sum``, ``tokenmill_step_decode_context_tokens_total``,
``tokenmill_step_duration_seconds_sum``). Between two scrapes a window holds
``n`` steps, ``T`` tokens, ``K`` context tokens and ``D`` seconds; a step costs
about ``a + b * tokens + c * context``, so ``D = a n + b T + c K``. Windows of
different mixes pin all three down by least squares over the last
``WINDOWS`` windows: ``a`` is the fixed cost of a step, ``b`` the cost of a
token computed (prefill's rate), ``c`` the cost of reading a token of KV
(what decoding long contexts costs every step). While the windows cannot tell
them apart, fewer terms are fitted (``a`` and ``b``, then ``b`` alone as
``D / T``, which errs slow).

The same scrape reads the worker's prefix-cache counters (tokenmill's or
vLLM's names), so the router reports measured cache hits beside predicted ones.
Workers that export none of this get the fleet's typical figures.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOWS = 30  # scrape windows in the fit
MIN_WINDOW_TOKENS = 256  # a window with less work says little
DEFAULT_SECONDS_PER_TOKEN = 1e-4  # 10k prefill tokens/s, until a worker is measured

_SERIES = {
    "tokenmill_step_tokens_count": "steps",
    "tokenmill_step_tokens_sum": "tokens",
    "tokenmill_step_duration_seconds_sum": "seconds",
    "tokenmill_step_decode_context_tokens_total": "context_tokens",
    "tokenmill_concurrency_limit": "concurrency_limit",
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
    context_tokens: float = 0.0
    cache_hits: float | None = None
    cache_queries: float | None = None
    concurrency_limit: float | None = None  # requests the worker runs at once (max_num_seqs or KV)
    engine: str | None = None  # tokenmill, vllm or sglang, from its metrics' names


def parse_counters(text: str) -> WorkerCounters:
    """The series the router uses from Prometheus text; the rest is skipped."""
    found: dict[str, float] = {}
    engine = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if engine is None:
            engine = next((e for prefix, e in _ENGINES if line.startswith(prefix)), None)
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
        context_tokens=found.get("context_tokens", 0.0),
        cache_hits=found.get("cache_hits"),
        cache_queries=found.get("cache_queries"),
        concurrency_limit=found.get("concurrency_limit"),
        engine=engine,
    )


_ENGINES = (("tokenmill_", "tokenmill"), ("vllm:", "vllm"), ("sglang:", "sglang"))


@dataclass(frozen=True)
class StepCost:
    """Seconds per step: ``per_step + per_token * tokens computed + per_context_token * KV read``."""

    per_step: float
    per_token: float
    per_context_token: float = 0.0


class StepCostFit:
    """A worker's ``StepCost``, fitted to the windows between scrapes (None until measured)."""

    def __init__(self) -> None:
        self._last: WorkerCounters | None = None
        self._windows: deque[tuple[float, float, float, float]] = deque(maxlen=WINDOWS)  # (n, T, K, D)
        self.cost: StepCost | None = None

    @property
    def seconds_per_token(self) -> float | None:
        return self.cost.per_token if self.cost else None

    def observe(self, counters: WorkerCounters) -> None:
        last, self._last = self._last, counters
        if last is None:
            return
        window = (
            counters.steps - last.steps,
            counters.tokens - last.tokens,
            counters.context_tokens - last.context_tokens,
            counters.seconds - last.seconds,
        )
        if min(window) < 0:  # the worker restarted: its counters began again
            self._windows.clear()
            return
        if window[1] >= MIN_WINDOW_TOKENS and window[3] > 0:
            self._windows.append(window)
            self.cost = self._fit()

    def reset(self) -> None:
        self._last = None
        self._windows.clear()

    def _fit(self) -> StepCost:
        data = np.array(self._windows, dtype=float)
        seconds = data[:, 3]
        for columns in ((0, 1, 2), (0, 1)):  # every term, then without KV reads
            x = data[:, columns]
            scale = np.linalg.norm(x, axis=0)
            if len(data) < len(columns) or not scale.all():
                continue
            coef, _, _, singular = np.linalg.lstsq(x / scale, seconds, rcond=None)
            coef = coef / scale
            # Columns nearly in proportion (every window the same mix) fit noise: fewer terms then.
            separable = singular.min() > 1e-3 * singular.max()
            if separable and coef.min() >= 0 and coef[1] > 0:
                return StepCost(*map(float, coef))
        return StepCost(0.0, float(seconds.sum() / data[:, 1].sum()))
