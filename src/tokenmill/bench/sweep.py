"""Several loads in a row: a sweep over concurrencies or rates, and the search for the highest
request rate that still meets the SLOs (``--find-max-goodput``).

Each point is a whole run of its own (fresh prompts, so a prefix cache never
carries over) and keeps its summary; the search is a doubling phase that
brackets the answer, then bisection. A probe counts as a success only when it
met the goodput target *and* was sent on schedule (achieved its offered rate,
schedule lag within bounds); the answer needs a rate that missed the SLO above
it, or the search says it found no upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.metrics import Summary


@dataclass(frozen=True)
class Point:
    profile: LoadProfile
    summary: Summary


def parse_values(text: str, name: str, cast: type = float) -> list[float]:
    """``"8"`` or ``"1,4,16"``; every value a finite number > 0."""
    parts = [v.strip() for v in text.split(",")]
    try:
        if not all(parts):
            raise ValueError
        values = [cast(v) for v in parts]
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{name} must be {kind} or a comma-separated list of them, got {text!r}") from None
    if any(not (math.isfinite(v) and v > 0) for v in values):
        kind = "integers" if cast is int else "finite numbers"
        raise ValueError(f"{name} values must be {kind} > 0, got {text!r}")
    return values


async def sweep(
    profiles: list[LoadProfile], run: Callable[[int, LoadProfile], Awaitable[Summary]]
) -> list[Point]:
    """Run every profile in turn (``run`` gets the point's index, for fresh data)."""
    return [Point(p, await run(i, p)) for i, p in enumerate(profiles)]


# What a probe of the search says. Only an SLO miss bounds the server's rate: a probe the
# client could not send on schedule says nothing about the server, so it is not a success,
# yet a search stopped only by such probes has found no upper bound.
PASS, SLO_MISS, CLIENT_BEHIND = "pass", "slo_miss", "client_behind"
VERDICTS = {
    PASS: "met the goodput target on schedule",
    SLO_MISS: "missed the goodput target",
    CLIENT_BEHIND: "the client fell behind its send schedule: not counted as a success",
}
MIN_ACHIEVED = 0.8  # a probe that sent at less than this share of its offered rate fell behind


@dataclass(frozen=True)
class GoodputSearch:
    probes: list[Point]
    best: Point | None  # the highest rate whose probe passed
    verdicts: list[str] = field(default_factory=list)  # per probe: PASS, SLO_MISS or CLIENT_BEHIND
    max_probes: int = 20

    @property
    def max_rate(self) -> float | None:
        """The answer, only when a higher rate missed the SLO (else the search found no bound)."""
        return None if self.best is None or not self.bounded else self.best.profile.rate

    @property
    def bounded(self) -> bool:
        """Some rate above the best one (or any rate, when none passed) missed the SLO: the
        search has an answer (a rate, or "none of the rates tried")."""
        floor = (self.best.profile.rate or 0.0) if self.best is not None else 0.0
        return any(
            v == SLO_MISS and (p.profile.rate or 0.0) > floor
            for p, v in zip(self.probes, self.verdicts, strict=True)
        )

    def verdict(self) -> str:
        """The search's answer, in words."""
        if self.best is not None and self.bounded:
            return f"{self.max_rate:.3g} req/s"
        if self.best is None and self.bounded:
            lowest = min(p.profile.rate or 0.0 for p in self.probes)
            return f"none of the rates tried (down to {lowest:.3g} req/s) met the target"
        if self.best is None:
            return (
                "no answer: no probe ran on schedule (the client fell behind at every rate tried); "
                "lower --rate, or see tokenmill bench calibrate"
            )
        passed = zip(self.probes, self.verdicts, strict=True)
        achieved = max(p.summary.achieved_rate for p, v in passed if v == PASS)
        why = (
            "faster probes fell behind their send schedule, so this is the client's limit, not the "
            "server's (see tokenmill bench calibrate)"
            if CLIENT_BEHIND in self.verdicts
            else f"the {self.max_probes} probes ran out first: start from a higher --rate"
        )
        return f"no rate failed up to {achieved:.3g} req/s achieved; {why}"

    def to_json(self) -> dict[str, Any]:
        return {
            "max_rate": self.max_rate,
            "answer": self.verdict(),
            "probes": [
                {
                    "rate": p.profile.rate,
                    "achieved_rate": p.summary.achieved_rate,
                    "good_fraction": p.summary.good_fraction,
                    "valid": p.summary.valid,
                    "verdict": v,
                    "best": p is self.best and self.bounded,
                }
                for p, v in zip(self.probes, self.verdicts, strict=True)
            ],
        }


def goodput_verdict(summary: Summary, target: float) -> str:
    """PASS, SLO_MISS or CLIENT_BEHIND for one probe of ``find_max_goodput``."""
    if summary.good_fraction is None:
        raise ValueError("--find-max-goodput needs --slo")
    offered = summary.offered_rate
    if not summary.valid or (offered and summary.achieved_rate < MIN_ACHIEVED * offered):
        return CLIENT_BEHIND
    return PASS if summary.good_fraction >= target else SLO_MISS


async def find_max_goodput(
    run: Callable[[int, LoadProfile], Awaitable[Summary]],
    start: LoadProfile,
    target: float = 0.9,
    bisections: int = 5,
    max_probes: int = 20,
) -> GoodputSearch:
    """The highest request rate at which at least ``target`` of the requests meet every SLO.

    Probes are ``start`` (its kind, burstiness and cap) at other rates; ``run`` must
    summarize with the SLOs (its summaries carry ``good_fraction``)."""
    if not 0 < target <= 1:
        raise ValueError(f"--goodput-target must be a fraction in (0, 1], got {target}")
    return await search_max_rate(run, start, lambda s: goodput_verdict(s, target), bisections, max_probes)


async def search_max_rate(
    run: Callable[[int, LoadProfile], Awaitable[Summary]],
    start: LoadProfile,
    judge: Callable[[Summary], str],
    bisections: int = 5,
    max_probes: int = 20,
) -> GoodputSearch:
    """The highest rate whose run ``judge`` calls PASS: doubles from ``start``'s rate until a
    probe fails, then bisects between the last rate that passed and the first that failed (or
    below the start, if even that failed)."""
    probes: list[Point] = []
    verdicts: list[str] = []

    async def probe(rate: float) -> bool:
        profile = replace(start, rate=rate)
        summary = await run(len(probes), profile)
        probes.append(Point(profile, summary))
        verdicts.append(judge(summary))
        return verdicts[-1] == PASS

    good: float | None = None
    bad: float | None = None
    rate = start.rate or 1.0
    while len(probes) < max_probes:
        if await probe(rate):
            good = rate
            rate *= 2
        else:
            bad = rate
            break
    if bad is not None:
        lo = good if good is not None else 0.0
        for _ in range(bisections):
            mid = (lo + bad) / 2
            if await probe(mid):
                good = lo = mid
            else:
                bad = mid
    best = next((p for p in probes if p.profile.rate == good), None)
    return GoodputSearch(probes, best, verdicts, max_probes)
