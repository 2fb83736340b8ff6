"""Runs side by side: ``tokenmill bench compare a.json b.json ...``.

Each run's summary comes from its ``.json``, the per-request values from the
``.events.jsonl`` beside it. Differences are against the first run (the
baseline), each with a 95% bootstrap confidence interval: requests of both
runs are resampled with replacement (2,000 times, seeded) and the statistic
recomputed, so "p99 TTFT fell 12 ms, CI [4, 19]" means the change is more than
this run's luck. Throughput gets no interval: a run is one measurement of it
(its requests share one duration and, with fixed output lengths, one token
count, so resampling them would give a zero-width interval that looks
significant); repeat runs to see its spread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.bench.metrics import Summary, summarize
from tokenmill.bench.records import RequestRecord, read_log

BOOTSTRAP_SAMPLES = 2000


@dataclass
class Run:
    label: str
    info: dict[str, Any]
    summary: Summary
    records: list[RequestRecord]
    gpus: int = 1
    cost_per_million: float | None = None

    @classmethod
    def load(cls, path: Path, label: str | None = None) -> Run:
        """A run from its summary JSON (``PREFIX.json``) or its event log (``PREFIX.events.jsonl``)."""
        stem = path.name.removesuffix(".events.jsonl").removesuffix(".json")
        summary_path = path.with_name(stem + ".json")
        info, records = read_log(path)  # any log, as bench report reads it (a copy named a.jsonl too)
        gpus, per_m = 1, None
        if summary_path.exists():
            try:
                saved = json.loads(summary_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{summary_path}: not a run's JSON summary ({e})") from None
            cost = saved.get("cost") or {}
            gpus, per_m = int(cost.get("gpus", 1)), cost.get("per_million_output_tokens")
        return cls(label or stem, info, summarize(records), records, gpus, per_m)


def mismatches(runs: list[Run]) -> list[str]:
    """What makes runs measure different things (model, data, endpoint): said, not refused,
    since comparing two models or two lengths is sometimes the point."""
    warnings = []
    base = runs[0]
    for run in runs[1:]:
        for key in ("model", "endpoint", "data"):
            if base.info.get(key) != run.info.get(key):
                theirs, ours = base.info.get(key), run.info.get(key)
                warnings.append(
                    f"{run.label} has {key} {ours!r}, {base.label} {theirs!r}: not the same workload"
                )
    for run in runs:
        if run.summary.succeeded == 0:
            warnings.append(f"{run.label}: no request succeeded, its latencies show as -")
    return warnings


def _per_request(records: list[RequestRecord]) -> dict[str, np.ndarray]:
    ok = [r for r in records if r.ok and r.first_token is not None and r.anchor is not None and r.end]
    ttft = np.array([r.first_token - r.anchor for r in ok])  # type: ignore[operator]
    tpot = np.array(
        [
            (r.last_token - r.first_token) / (r.num_output_tokens - 1)  # type: ignore[operator]
            if r.num_output_tokens > 1
            else np.nan
            for r in ok
        ]
    )
    e2e = np.array([r.end - r.anchor for r in ok])  # type: ignore[operator]
    tokens = np.array([r.num_output_tokens for r in ok], dtype=np.float64)
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "tokens": tokens}


NO_INTERVAL = {"output_tok_s"}  # one figure per run: see the module's docstring
NO_INTERVAL_WHY = "throughput: one figure per run, no interval (repeat the runs to see its spread)"

STATISTICS: list[tuple[str, str, str, float, bool]] = [
    # (key, label, array, scale, higher is better)
    ("ttft_p50", "TTFT p50 ms", "ttft", 1000.0, False),
    ("ttft_p99", "TTFT p99 ms", "ttft", 1000.0, False),
    ("tpot_p50", "TPOT p50 ms", "tpot", 1000.0, False),
    ("tpot_p99", "TPOT p99 ms", "tpot", 1000.0, False),
    ("e2e_p50", "E2E p50 s", "e2e", 1.0, False),
    ("output_tok_s", "output tok/s", "tokens", 1.0, True),
]


@dataclass(frozen=True)
class Difference:
    value: float  # this run's statistic
    delta: float | None  # minus the baseline's
    low: float | None  # 95% bootstrap interval of delta
    high: float | None

    @property
    def significant(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def compare(runs: list[Run], seed: int = 0) -> dict[str, list[Difference]]:
    """Each statistic of each run, with its difference from ``runs[0]`` and the interval of that."""
    rng = np.random.default_rng(seed)
    arrays = [_per_request(r.records) for r in runs]
    durations = [max(r.summary.duration_s, 1e-9) for r in runs]
    table: dict[str, list[Difference]] = {}
    for key, _, array, scale, _ in STATISTICS:
        point = [_stat(key, a[array], d) * scale for a, d in zip(arrays, durations, strict=True)]
        row = [Difference(point[0], None, None, None)]
        if key in NO_INTERVAL:
            table[key] = row + [Difference(v, v - point[0], None, None) for v in point[1:]]
            continue
        boots = [_bootstrap(key, a[array], rng) * scale for a in arrays]
        for i in range(1, len(runs)):
            deltas = boots[i] - boots[0]
            deltas = deltas[np.isfinite(deltas)]
            low, high = np.percentile(deltas, [2.5, 97.5]) if len(deltas) else (np.nan, np.nan)
            row.append(Difference(point[i], point[i] - point[0], float(low), float(high)))
        table[key] = row
    return table


def _stat(key: str, values: np.ndarray, duration: float) -> float:
    values = values[np.isfinite(values)]
    if key == "output_tok_s":  # no successful request: no tokens, 0 tok/s (not an unknown)
        return float(values.sum() / duration)
    if not len(values):
        return float("nan")
    return float(np.percentile(values, 50 if key.endswith("p50") else 99))


def _bootstrap(key: str, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    values = values[np.isfinite(values)]
    if not len(values):
        return np.full(BOOTSTRAP_SAMPLES, np.nan)
    samples = values[rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))]
    return np.percentile(samples, 50 if key.endswith("p50") else 99, axis=1)
