"""Scheduling scenarios: the workloads, the step-loop driver and the metrics, shared by every engine.

Both engines are driven the same way: a loop that adds each request when its
arrival time has come (or when its trigger fires), calls the engine's
``step()`` and stamps every token with the wall clock at the moment the step
returned it. TTFT counts from the scheduled arrival, so a late ``add`` (the
driver was inside a step) counts against the engine, as it would for a client.

Standard library only: the vllm venv imports it too.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

SCENARIOS = ("shared_prefix", "priority", "chunked_prefill")


@dataclass
class Arrival:
    rid: str
    token_ids: list[int]
    max_tokens: int
    priority: int = 0  # tokenmill's convention: higher is more important
    at: float = 0.0  # seconds after the phase starts
    # Or: arrives once every request added before it has at least this many output tokens.
    after_tokens: int | None = None


@dataclass
class Record:
    rid: str
    priority: int
    num_prompt_tokens: int
    max_tokens: int
    arrival: float = 0.0
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finished: float | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


class Adapter(Protocol):
    def add(self, arrival: Arrival) -> None: ...

    def step(self) -> list[tuple[str, list[int], bool]]:
        """Outputs of one step: (request id, all its output token ids so far, finished)."""
        ...

    def has_unfinished(self) -> bool: ...

    def reset_prefix_cache(self) -> None: ...


def drive(adapter: Adapter, arrivals: list[Arrival], timeout: float = 600.0) -> dict[str, Record]:
    """Run one phase to completion; returns a record per request."""
    timed = sorted((a for a in arrivals if a.after_tokens is None), key=lambda a: a.at)
    triggered = [a for a in arrivals if a.after_tokens is not None]
    records: dict[str, Record] = {}
    t0 = time.perf_counter()

    def admit(a: Arrival, when: float) -> None:
        records[a.rid] = Record(a.rid, a.priority, len(a.token_ids), a.max_tokens, arrival=when)
        adapter.add(a)

    while timed or triggered or adapter.has_unfinished():
        now = time.perf_counter()
        if now - t0 > timeout:
            raise TimeoutError(f"phase still running after {timeout:.0f} s")
        while timed and t0 + timed[0].at <= now:
            a = timed.pop(0)
            admit(a, t0 + a.at)
        for a in list(triggered):
            if records and all(len(r.token_ids) >= a.after_tokens for r in records.values()):  # type: ignore[operator]
                triggered.remove(a)
                admit(a, time.perf_counter())
        if not adapter.has_unfinished():
            if timed:
                time.sleep(max(0.0, t0 + timed[0].at - time.perf_counter()))
            continue
        outputs = adapter.step()
        stamp = time.perf_counter()
        for rid, ids, finished in outputs:
            rec = records[rid]
            rec.token_times.extend([stamp] * (len(ids) - len(rec.token_ids)))
            rec.token_ids = list(ids)
            if finished and rec.finished is None:
                rec.finished = stamp
    return records


# -- workloads -------------------------------------------------------------------------------------------


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # 0-2 are the special tokens


def shared_prefix_arrivals(vocab: int, quick: bool = False, seed: int = 0) -> list[Arrival]:
    """64 requests of one 512-token prefix + 32 unique tokens, 16 output tokens, all at once."""
    rng = random.Random(seed)
    n, prefix_len = (16, 256) if quick else (64, 512)
    prefix = _tokens(rng, prefix_len, vocab)
    return [Arrival(f"sp-{i}", prefix + _tokens(rng, 32, vocab), 16) for i in range(n)]


def warmup_arrivals(
    vocab: int, tag: str, n: int = 4, prompt_len: int = 64, max_tokens: int = 8
) -> list[Arrival]:
    rng = random.Random(hash(tag) & 0xFFFF)
    return [Arrival(f"warm-{tag}-{i}", _tokens(rng, prompt_len, vocab), max_tokens) for i in range(n)]


@dataclass(frozen=True)
class PriorityLoad:
    prompt_len: int = 128
    max_tokens: int = 64
    max_num_seqs: int = 32
    overload: float = 1.5  # arrival rate / capacity
    premium_share: float = 0.1
    num_requests: int = 320


def priority_load(quick: bool) -> PriorityLoad:
    return PriorityLoad(num_requests=48, max_tokens=32) if quick else PriorityLoad()


def capacity_arrivals(vocab: int, load: PriorityLoad, seed: int = 1) -> list[Arrival]:
    """Twice the running slots at once: the engine runs saturated, which gives its capacity."""
    rng = random.Random(seed)
    return [
        Arrival(f"cap-{i}", _tokens(rng, load.prompt_len, vocab), load.max_tokens)
        for i in range(2 * load.max_num_seqs)
    ]


def poisson_arrivals(vocab: int, load: PriorityLoad, rate: float, seed: int = 2) -> list[Arrival]:
    """Poisson arrivals at ``rate`` requests/s; a ``premium_share`` of them have priority 1."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(load.num_requests):
        t += rng.expovariate(rate)
        premium = rng.random() < load.premium_share
        out.append(
            Arrival(f"po-{i}", _tokens(rng, load.prompt_len, vocab), load.max_tokens, 1 if premium else 0, t)
        )
    return out


def idle_premium_arrivals(
    vocab: int, load: PriorityLoad, count: int = 5, seed: int = 3
) -> list[list[Arrival]]:
    """One premium request at a time on an idle engine: the TTFT to beat under load."""
    rng = random.Random(seed)
    return [
        [Arrival(f"idle-{i}", _tokens(rng, load.prompt_len, vocab), load.max_tokens, 1)] for i in range(count)
    ]


def chunked_prefill_arrivals(vocab: int, quick: bool = False, seed: int = 4) -> list[Arrival]:
    """8 requests decoding (64-token prompts, 256 output), then one 2,000-token prompt arrives."""
    rng = random.Random(seed)
    runners, long_len, out_len = (8, 1000, 96) if quick else (8, 2000, 256)
    arrivals = [Arrival(f"run-{i}", _tokens(rng, 64, vocab), out_len) for i in range(runners)]
    arrivals.append(Arrival("long", _tokens(rng, long_len, vocab), 16, after_tokens=32))
    return arrivals


# -- metrics ---------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linear between order statistics."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def phase_summary(records: dict[str, Record]) -> dict[str, Any]:
    recs = [r for r in records.values() if r.token_times]
    start = min(r.arrival for r in records.values())
    end = max(r.finished or r.token_times[-1] for r in recs)
    tokens = sum(len(r.token_ids) for r in recs)
    ttft = [r.ttft for r in recs]
    return {
        "requests": len(records),
        "completed": sum(1 for r in records.values() if r.finished is not None),
        "duration_s": end - start,
        "output_tokens": tokens,
        "output_tok_s": tokens / (end - start) if end > start else float("nan"),
        "mean_ttft_s": statistics.fmean(ttft) if ttft else float("nan"),
        "p50_ttft_s": pct(ttft, 0.5),
        "p99_ttft_s": pct(ttft, 0.99),
    }


def class_ttft(records: dict[str, Record], priority: int) -> dict[str, float]:
    ttft = [r.ttft for r in records.values() if r.priority == priority and r.token_times]
    return {
        "count": len(ttft),
        "p50_ttft_s": pct(ttft, 0.5),
        "p99_ttft_s": pct(ttft, 0.99),
        "max_ttft_s": max(ttft) if ttft else float("nan"),
    }


def decode_gaps(records: dict[str, Record], exclude: str) -> dict[str, float]:
    """Inter-token gaps of every request but ``exclude`` (the long prompt)."""
    gaps = [g for r in records.values() if r.rid != exclude for g in r.gaps]
    return {"median_gap_s": pct(gaps, 0.5), "p99_gap_s": pct(gaps, 0.99), "max_gap_s": max(gaps)}


def median_of(runs: list[Any]) -> Any:
    """The median of each numeric leaf across runs of the same shape (other leaves from the first run)."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        return statistics.median(runs)
    return first
