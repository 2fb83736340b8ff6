"""Load profiles: when each request goes out.

- ``concurrency``: closed loop, ``N`` requests in flight, a new one as one ends;
  latencies count from the actual send (there is no intended time).
- ``constant``: one request every ``1/rate`` s.
- ``poisson``: exponential gaps of mean ``1/rate`` (independent arrivals).
- ``gamma``: gamma gaps of mean ``1/rate`` and shape ``burstiness`` (vLLM's
  definition: 1 is Poisson, below 1 burstier, above 1 more even).
- ``trace``: the times a trace file gives.

Open-loop profiles fix every intended send time before the run starts (seeded),
and a late send is measured as schedule lag rather than shifting the schedule.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

PROFILES = ("concurrency", "constant", "poisson", "gamma", "trace")


@dataclass(frozen=True)
class LoadProfile:
    kind: str
    rate: float | None = None  # requests/s (constant, poisson, gamma)
    concurrency: int | None = None  # closed loop: requests in flight
    burstiness: float = 1.0  # gamma shape
    max_concurrency: int | None = None  # open loop: a cap on requests in flight (None: none)

    def __post_init__(self) -> None:
        if self.kind not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.kind!r}")
        if self.kind == "concurrency":
            if self.concurrency is None or self.concurrency < 1:
                raise ValueError(f"concurrency must be a whole number >= 1, got {self.concurrency}")
        elif self.kind != "trace" and (self.rate is None or not 0 < self.rate < math.inf):
            raise ValueError(
                f"rate must be a number of requests/s > 0 for --profile {self.kind}, got {self.rate}"
            )
        if not 0 < self.burstiness < math.inf:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def open_loop(self) -> bool:
        return self.kind != "concurrency"

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency {self.concurrency}"
        if self.kind == "trace":
            return "trace"
        extra = f", burstiness {self.burstiness:g}" if self.kind == "gamma" else ""
        return f"{self.kind} {self.rate:g} req/s{extra}"


def intended_times(
    profile: LoadProfile, n: int, seed: int = 0, trace: list[float] | None = None
) -> list[float]:
    """Send times of ``n`` requests, seconds from the start; the first at 0 for rate profiles."""
    if profile.kind == "concurrency":
        raise ValueError("a closed-loop profile has no intended times")
    if profile.kind == "trace":
        if trace is None or len(trace) < n:
            raise ValueError(f"the trace gives {0 if trace is None else len(trace)} times for {n} requests")
        start = min(trace[:n])
        return [t - start for t in trace[:n]]
    assert profile.rate is not None
    if profile.kind == "constant":
        return [i / profile.rate for i in range(n)]
    rng = random.Random(seed)
    shape = 1.0 if profile.kind == "poisson" else profile.burstiness
    scale = 1.0 / (profile.rate * shape)  # mean gap = shape * scale = 1 / rate
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(shape, scale)
    return times


def read_trace(path: str) -> list[dict[str, float]]:
    """A trace: JSONL of ``{"timestamp": seconds, "input_tokens": n, "output_tokens": n}``
    (lengths optional), in any order; returned sorted by time."""
    import json

    rows = []
    for lineno, line in enumerate(_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            t = float(row["timestamp"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f'{path}:{lineno}: each line needs "timestamp" (seconds)') from None
        if not math.isfinite(t) or isinstance(row["timestamp"], bool):
            # NaN would leave every latency NaN and the event log invalid JSON
            stamp = row["timestamp"]
            raise ValueError(
                f'{path}:{lineno}: "timestamp" must be a finite number of seconds, got {stamp!r}'
            )
        for key in ("input_tokens", "output_tokens"):
            if key in row and (type(row[key]) is not int or row[key] < 1):  # a bool is no length
                raise ValueError(f"{path}:{lineno}: {key} must be an integer >= 1, got {row[key]!r}")
        rows.append({"timestamp": t, **{k: row[k] for k in ("input_tokens", "output_tokens") if k in row}})
    if not rows:
        raise ValueError(f"{path} holds no requests")
    return sorted(rows, key=lambda r: r["timestamp"])


def _text_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): a trace is JSONL") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a trace file") from None
