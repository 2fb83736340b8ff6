"""Sweeps and the max-goodput search, on a server model whose capacity is known."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from tokenmill.bench.load import LoadProfile
from tokenmill.bench.sweep import find_max_goodput, parse_values, sweep


def capacity_model(capacity: float):
    """All requests good up to ``capacity`` req/s, half of them past it."""
    seen: list[tuple[int, float]] = []

    async def run(i, profile):
        seen.append((i, profile.rate))
        return SimpleNamespace(good_fraction=1.0 if profile.rate <= capacity else 0.5, valid=True)

    return run, seen


def test_the_search_doubles_then_bisects_to_the_capacity():
    run, seen = capacity_model(37.0)
    result = asyncio.run(find_max_goodput(run, start_rate=1.0, bisections=5))
    assert [rate for _, rate in seen] == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert result.max_rate == 37.0 and [i for i, _ in seen] == list(range(12))


def test_a_start_above_capacity_searches_below_it():
    run, _ = capacity_model(3.0)
    result = asyncio.run(find_max_goodput(run, start_rate=10.0, bisections=6))
    assert 2.5 < result.max_rate <= 3.0


def test_nothing_meets_the_target_gives_no_rate():
    async def run(i, profile):
        return SimpleNamespace(good_fraction=0.1, valid=True)

    assert asyncio.run(find_max_goodput(run, start_rate=1.0, bisections=3)).max_rate is None


def test_an_invalid_probe_does_not_count_as_good():
    async def run(i, profile):
        return SimpleNamespace(good_fraction=1.0, valid=profile.rate < 5)

    assert asyncio.run(find_max_goodput(run, start_rate=1.0, bisections=4)).max_rate == pytest.approx(
        4.75
    )  # 8, 6, 5 fail; 4.5, 4.75 pass


def test_a_sweep_runs_every_point_in_order():
    async def run(i, profile):
        return SimpleNamespace(index=i, concurrency=profile.concurrency)

    points = asyncio.run(sweep([LoadProfile("concurrency", concurrency=c) for c in (1, 4, 16)], run))
    assert [(p.summary.index, p.summary.concurrency) for p in points] == [(0, 1), (1, 4), (2, 16)]


@pytest.mark.parametrize("text", ["", "a", "1,,x", "0", "4,-1"])
def test_bad_value_lists_name_the_option(text):
    with pytest.raises(ValueError, match="--rate"):
        parse_values(text, "--rate")
