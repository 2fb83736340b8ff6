"""Several loads in a row: a sweep over concurrencies or rates, and the search for the highest
request rate that still meets the SLOs (``--find-max-goodput``).

Each point is a whole run of its own (fresh prompts, so a prefix cache never
carries over) and keeps its summary; the search is a doubling phase that
brackets the answer, then bisection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.metrics import Summary


@dataclass(frozen=True)
class Point:
    profile: LoadProfile
    summary: Summary


def parse_values(text: str, name: str, cast: type = float) -> list[float]:
    """``"8"`` or ``"1,4,16"``; every value > 0."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{name} must be a number or a comma-separated list of numbers, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{name} values must be > 0, got {text!r}")
    return values


async def sweep(
    profiles: list[LoadProfile], run: Callable[[int, LoadProfile], Awaitable[Summary]]
) -> list[Point]:
    """Run every profile in turn (``run`` gets the point's index, for fresh data)."""
    return [Point(p, await run(i, p)) for i, p in enumerate(profiles)]


@dataclass(frozen=True)
class GoodputSearch:
    probes: list[Point]
    best: Point | None  # the highest rate whose good fraction met the target

    @property
    def max_rate(self) -> float | None:
        return None if self.best is None else self.best.profile.rate


async def find_max_goodput(
    run: Callable[[int, LoadProfile], Awaitable[Summary]],
    start_rate: float,
    target: float = 0.9,
    bisections: int = 5,
    max_probes: int = 20,
    kind: str = "poisson",
) -> GoodputSearch:
    """The highest request rate at which at least ``target`` of the requests meet every SLO.

    ``run`` must summarize with the SLOs (its summaries carry ``good_fraction``);
    a probe whose own schedule lagged (an invalid run) counts as a miss."""
    if not 0 < target <= 1:
        raise ValueError(f"the goodput target must be a fraction in (0, 1], got {target}")

    def passes(summary: Summary) -> bool:
        if summary.good_fraction is None:
            raise ValueError("--find-max-goodput needs --slo")
        return summary.good_fraction >= target and summary.valid

    return await search_max_rate(run, start_rate, passes, bisections, max_probes, kind)


async def search_max_rate(
    run: Callable[[int, LoadProfile], Awaitable[Summary]],
    start_rate: float,
    passes: Callable[[Summary], bool],
    bisections: int = 5,
    max_probes: int = 20,
    kind: str = "poisson",
) -> GoodputSearch:
    """The highest rate whose run ``passes``: doubles from ``start_rate`` until a probe fails,
    then bisects between the last rate that passed and the first that failed (or below the
    start, if even that failed)."""
    probes: list[Point] = []

    async def probe(rate: float) -> bool:
        profile = LoadProfile(kind, rate=rate)
        summary = await run(len(probes), profile)
        probes.append(Point(profile, summary))
        return passes(summary)

    good: float | None = None
    bad: float | None = None
    rate = start_rate
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
    best = max(
        (p for p in probes if p.profile.rate == good), key=lambda p: p.profile.rate or 0.0, default=None
    )
    return GoodputSearch(probes, best)
