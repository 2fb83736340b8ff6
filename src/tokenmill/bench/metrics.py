"""Serving metrics from a run's records, with the formulas a report prints in its header.

Anchor: latencies count from a request's intended send time in open-loop runs
(so a client that falls behind cannot hide the server's queueing: no
coordinated omission) and from its actual send in closed-loop runs.

- TTFT: first message with content - anchor.
- TPOT (per request): (last token - first token) / (output tokens - 1); requests with one token have none.
- ITL (per token): the gap before each content message, divided over the tokens it carried.
- E2E latency: last byte - anchor.
- Schedule lag: actual send - intended send - queue wait (open loop only): the
  client's own delay. A run whose lag p99 passes --max-lag-p99 is invalid.
- Queue wait: time a request waited for a free slot under --max-concurrency
  before it was sent: the server's backlog, already inside TTFT and E2E (they
  count from the intended send), so it does not invalidate a run.
- Per-user tok/s: a request's own decode rate, 1 / TPOT.
- Throughput: tokens (server usage; counted messages where it gave none) of
  successful requests / duration; duration = from the run's start to the last
  response's end. Request throughput counts successful requests.
- Goodput (DistServe): successful requests meeting every SLO, per second of duration.
- Weighting: TTFT, TPOT, E2E and per-user tok/s are one value per successful
  request (a long request counts as much as a short one); ITL is one value per
  output token; failed requests count only in errors and goodput.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tokenmill.bench.records import RequestRecord

FORMULAS = __doc__.split("\n\n", 1)[1].strip() if __doc__ else ""
SLO_METRICS = ("ttft", "tpot", "itl", "e2e")
HEADER = (
    "TTFT and E2E from the intended send (open loop) or the send (closed loop); "
    "TPOT = (last - first token) / (tokens - 1) per request; ITL per token; "
    "statistics over successful requests (ITL: over tokens); tokens from the server's usage"
)
DEFAULT_MAX_LAG_P99 = 0.010  # s; a run whose sends lag more is not the load it claims to be


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    median: float
    p90: float
    p95: float
    p99: float
    max: float
    min: float

    @classmethod
    def of(cls, values: list[float]) -> Distribution | None:
        if not values:
            return None
        a = np.asarray(values, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(a, [50, 90, 95, 99])  # linear interpolation, as numpy and vLLM
        return cls(
            len(a),
            float(a.mean()),
            float(p50),
            float(p90),
            float(p95),
            float(p99),
            float(a.max()),
            float(a.min()),
        )


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; a request is good when it meets every one given."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None  # on the request's worst gap
    e2e: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLO:
        """``ttft=0.3,tpot=0.05`` (seconds; ``300ms`` also works)."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, value = part.partition("=")
            if not eq or name not in SLO_METRICS:
                raise ValueError(
                    f"--slo takes name=seconds with names {', '.join(SLO_METRICS)}, got {part!r}"
                )
            if name in values:
                raise ValueError(f"--slo gives {name} twice: give each target once")
            try:
                values[name] = float(value[:-2]) / 1000 if value.endswith("ms") else float(value.rstrip("s"))
            except ValueError:
                raise ValueError(f"--slo {name} must be a number of seconds, got {value!r}") from None
            if not 0 < values[name] < float("inf"):
                raise ValueError(f"--slo {name} must be a finite number of seconds > 0, got {value!r}")
        if not values:
            raise ValueError("--slo needs at least one target, e.g. ttft=0.3,tpot=0.05")
        return cls(**values)

    def met(self, r: RequestRecord, anchor: float) -> bool:
        if not r.ok or r.first_token is None or r.end is None:
            return False
        checks = {
            "ttft": (r.first_token or 0.0) - anchor,
            "tpot": _tpot(r) or 0.0,
            "itl": max((b[0] - a[0] for a, b in itertools.pairwise(r.content)), default=0.0),
            "e2e": r.end - anchor,
        }
        return all(getattr(self, name) is None or checks[name] <= getattr(self, name) for name in SLO_METRICS)

    def __str__(self) -> str:
        return ",".join(f"{n}={getattr(self, n):g}" for n in SLO_METRICS if getattr(self, n) is not None)


@dataclass(frozen=True)
class Summary:
    requests: int
    succeeded: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    request_tput: float  # successful requests / s
    input_tok_s: float
    output_tok_s: float
    total_tok_s: float
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    e2e: Distribution | None
    per_user_tok_s: Distribution | None
    schedule_lag: Distribution | None  # open loop only: the client's own delay
    offered_rate: float | None  # intended requests / s (open loop)
    achieved_rate: float  # requests the client issued / s (before any wait for a --max-concurrency slot)
    token_mismatches: int  # usage output tokens != tokens asked for, or != counted messages
    valid: bool
    invalid_reason: str | None
    slo: str | None = None
    good: int | None = None
    goodput: float | None = None  # good requests / s
    good_fraction: float | None = None
    workers: dict[str, dict[str, int]] | None = None  # x-tokenmill-worker -> requests, output tokens
    worker_imbalance: float | None = None  # max / mean requests per worker
    worker_token_imbalance: float | None = None  # max / mean output tokens per worker
    queue_wait: Distribution | None = None  # waits for a --max-concurrency slot (None: nobody waited)
    queued: int = 0  # requests that waited for a slot
    retokenized: int = 0  # replies whose text was counted again by a tokenizer
    retokenized_mismatches: int = 0  # ... and whose count differs from the server's usage
    # error kind -> the first such failure's message (with its HTTP status): why, not only how many
    error_samples: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    records: list[RequestRecord], slo: SLO | None = None, max_lag_p99: float = DEFAULT_MAX_LAG_P99
) -> Summary:
    ok = [r for r in records if r.ok]
    duration = max((r.end for r in records if r.end is not None), default=0.0)  # times count from the start

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    input_tokens = sum(r.prompt_tokens or r.expected_prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.num_output_tokens for r in ok)
    lag = Distribution.of(
        [d - r.intended for r in records if r.intended is not None and (d := r.dispatched) is not None]
    )
    waits = [r.queued for r in records if r.sent is not None]
    valid, reason = True, None
    if lag is not None and lag.p99 > max_lag_p99:
        valid = False
        reason = (
            f"schedule lag p99 {lag.p99 * 1000:.1f} ms > {max_lag_p99 * 1000:g} ms: "
            "the client fell behind its schedule"
        )
    tpots = [t for r in ok if (t := _tpot(r)) is not None]
    goodness: dict[str, Any] = {}
    if slo is not None:
        good = sum(1 for r in ok if (a := r.anchor) is not None and slo.met(r, a))
        fraction = good / len(records) if records else 0.0
        goodness = {"slo": str(slo), "good": good, "goodput": per_s(good), "good_fraction": fraction}
    workers = _workers(ok)
    if workers:
        goodness.update(
            workers=workers,
            worker_imbalance=_imbalance([w["requests"] for w in workers.values()]),
            worker_token_imbalance=_imbalance([w["output_tokens"] for w in workers.values()]),
        )
    if any(w > 0 for w in waits):
        goodness.update(queue_wait=Distribution.of(waits), queued=sum(1 for w in waits if w > 0))
    return Summary(
        requests=len(records),
        succeeded=len(ok),
        failed=len(records) - len(ok),
        errors=dict(Counter(r.error_kind for r in records if r.error_kind)),
        error_samples=_error_samples(records),
        duration_s=duration,
        request_tput=per_s(len(ok)),
        input_tok_s=per_s(input_tokens),
        output_tok_s=per_s(output_tokens),
        total_tok_s=per_s(input_tokens + output_tokens),
        ttft=Distribution.of(
            [t - a for r in ok if (t := r.first_token) is not None and (a := r.anchor) is not None]
        ),
        tpot=Distribution.of(tpots),
        itl=Distribution.of([gap for r in ok for gap in _itls(r)]),
        e2e=Distribution.of([r.end - a for r in ok if r.end is not None and (a := r.anchor) is not None]),
        per_user_tok_s=Distribution.of([1.0 / t for t in tpots if t > 0]),
        schedule_lag=lag,
        offered_rate=_rate([r.intended for r in records if r.intended is not None]),
        achieved_rate=_rate([d for r in records if (d := r.dispatched) is not None]) or 0.0,
        token_mismatches=sum(1 for r in ok if _mismatch(r)),
        retokenized=sum(1 for r in ok if r.retokenized_output_tokens is not None),
        retokenized_mismatches=sum(
            1
            for r in ok
            if r.retokenized_output_tokens is not None and r.retokenized_output_tokens != r.num_output_tokens
        ),
        valid=valid,
        invalid_reason=reason,
        **goodness,
    )


def _error_samples(records: list[RequestRecord]) -> dict[str, str]:
    samples: dict[str, str] = {}
    for r in records:
        if r.error_kind and r.error_kind not in samples:
            status = f"{r.status}: " if r.status and r.status != 200 else ""
            samples[r.error_kind] = status + (r.error or "no message")
    return samples


def _rate(times: list[float]) -> float | None:
    """Events per second over the span they cover (n - 1 gaps)."""
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


def _imbalance(counts: list[int]) -> float | None:
    """max / mean: 1 is an even spread."""
    mean = sum(counts) / len(counts)
    return max(counts) / mean if mean > 0 else None


def _tpot(r: RequestRecord) -> float | None:
    n, content = r.num_output_tokens, r.content
    if len(content) < 2 or n < 2:
        return None
    return (content[-1][0] - content[0][0]) / (n - 1)


def _itls(r: RequestRecord) -> list[float]:
    gaps = []
    for (t0, _), (t1, n) in itertools.pairwise(r.content):
        gaps.extend([(t1 - t0) / n] * n)
    return gaps


def _mismatch(r: RequestRecord) -> bool:
    if r.output_tokens is None:
        return False
    if r.expected_output_tokens is not None and r.output_tokens != r.expected_output_tokens:
        return True
    return r.output_tokens != r.counted_output_tokens


def _workers(records: list[RequestRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.worker:
            w = out.setdefault(r.worker, {"requests": 0, "output_tokens": 0})
            w["requests"] += 1
            w["output_tokens"] += r.num_output_tokens
    return out
