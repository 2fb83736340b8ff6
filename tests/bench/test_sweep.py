"""Sweeps and the max-goodput search, on a server model whose capacity is known."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.sweep import find_max_goodput, goodput_verdict, parse_values, sweep

POISSON_1 = LoadProfile("poisson", rate=1.0)


def summary(good_fraction, rate, valid=True, achieved=None):
    """What the search reads of a probe's summary: by default it sent at its offered rate."""
    return SimpleNamespace(
        good_fraction=good_fraction,
        valid=valid,
        offered_rate=rate,
        achieved_rate=rate if achieved is None else achieved,
    )


def capacity_model(capacity: float):
    """All requests good up to ``capacity`` req/s, half of them past it."""
    seen: list[tuple[int, float]] = []

    async def run(i, profile):
        seen.append((i, profile.rate))
        return summary(good_fraction=1.0 if profile.rate <= capacity else 0.5, rate=profile.rate)

    return run, seen


def test_the_search_doubles_then_bisects_to_the_capacity():
    run, seen = capacity_model(37.0)
    result = asyncio.run(find_max_goodput(run, POISSON_1, bisections=5))
    assert [rate for _, rate in seen] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert result.max_rate == 37.0 and [i for i, _ in seen] == list(range(12))


def test_a_start_above_capacity_searches_below_it():
    run, _ = capacity_model(3.0)
    result = asyncio.run(find_max_goodput(run, LoadProfile("poisson", rate=10.0), bisections=6))
    assert 2.5 < result.max_rate <= 3.0


def test_nothing_meets_the_target_gives_no_rate():
    async def run(i, profile):
        return summary(good_fraction=0.1, rate=profile.rate)

    result = asyncio.run(find_max_goodput(run, POISSON_1, bisections=3))
    assert result.max_rate is None and result.bounded  # an answer: no rate meets the target
    assert result.verdict().startswith("none of the rates tried (down to 0.125 req/s)")


def test_an_invalid_probe_does_not_count_as_good():
    async def run(i, profile):
        return summary(
            good_fraction=1.0 if profile.rate < 6 else 0.5, rate=profile.rate, valid=not 5 <= profile.rate < 6
        )

    result = asyncio.run(find_max_goodput(run, POISSON_1, bisections=4))
    assert result.max_rate == pytest.approx(4.75)  # 8 misses; 6 misses, 5 falls behind; 4.5, 4.75 pass
    assert result.verdicts == [
        "pass",
        "pass",
        "pass",
        "slo_miss",
        "slo_miss",
        "client_behind",
        "pass",
        "pass",
    ]


def test_a_sweep_runs_every_point_in_order():
    async def run(i, profile):
        return SimpleNamespace(index=i, concurrency=profile.concurrency)

    points = asyncio.run(sweep([LoadProfile("concurrency", concurrency=c) for c in (1, 4, 16)], run))
    assert [(p.summary.index, p.summary.concurrency) for p in points] == [(0, 1), (1, 4), (2, 16)]


@pytest.mark.parametrize("text", ["", "a", "1,,x", "0", "4,-1", "1,,2", "inf", "nan", "1e400"])
def test_bad_value_lists_name_the_option(text):
    with pytest.raises(ValueError, match="--rate"):
        parse_values(text, "--rate")


def test_a_client_that_cannot_keep_up_is_no_upper_bound():
    # The server meets the SLO at any rate; this client sends at most 3,000 req/s. Before, the
    # search "found" 4.19e6 req/s (its 20th probe); a probe sent far below its rate is no success.
    async def run(i, profile):
        return summary(good_fraction=1.0, rate=profile.rate, achieved=min(profile.rate, 3000.0))

    result = asyncio.run(find_max_goodput(run, LoadProfile("poisson", rate=1000.0), bisections=3))
    assert result.max_rate is None and not result.bounded
    assert "client_behind" in result.verdicts and "slo_miss" not in result.verdicts
    assert result.verdict().startswith("no rate failed up to 3e+03 req/s achieved; faster probes fell behind")
    saved = result.to_json()
    assert saved["max_rate"] is None and saved["answer"].startswith("no rate failed")
    assert [p["verdict"] for p in saved["probes"]][:3] == ["pass", "pass", "client_behind"]


def test_a_search_that_runs_out_of_probes_says_so():
    async def run(i, profile):
        return summary(good_fraction=1.0, rate=profile.rate)

    result = asyncio.run(find_max_goodput(run, POISSON_1, max_probes=4))
    assert len(result.probes) == 4 and result.max_rate is None
    assert (
        result.verdict()
        == "no rate failed up to 8 req/s achieved; the 4 probes ran out first: start from a higher --rate"
    )


def test_the_search_keeps_the_profile_it_was_given():
    seen = []

    async def run(i, profile):
        seen.append(profile)
        return summary(good_fraction=1.0 if profile.rate <= 3 else 0.0, rate=profile.rate)

    start = LoadProfile("gamma", rate=1.0, burstiness=0.3, max_concurrency=4)
    asyncio.run(find_max_goodput(run, start, bisections=1))
    assert [p.rate for p in seen] == [1.0, 2.0, 4.0, 3.0]
    assert {(p.kind, p.burstiness, p.max_concurrency) for p in seen} == {("gamma", 0.3, 4)}


@pytest.mark.parametrize(
    ("good", "valid", "achieved", "verdict"),
    [
        (1.0, True, 10.0, "pass"),
        (0.5, True, 10.0, "slo_miss"),
        (1.0, False, 10.0, "client_behind"),  # its schedule lag passed --max-lag-p99
        (1.0, True, 7.0, "client_behind"),  # sent 30% under its offered 10 req/s
    ],
)
def test_a_probe_is_a_success_only_on_schedule_and_on_target(good, valid, achieved, verdict):
    assert goodput_verdict(summary(good, 10.0, valid, achieved), 0.9) == verdict


def test_the_goodput_target_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"--goodput-target must be a fraction in \(0, 1\], got 1.5"):
        asyncio.run(find_max_goodput(None, POISSON_1, target=1.5))
