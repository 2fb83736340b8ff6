"""A worker's prefill speed fitted from its step counters; the counters read from Prometheus text."""

from __future__ import annotations

import random
from collections import deque

import pytest

from tokenmill.router.calibration import StepCostFit, WorkerCounters, parse_counters

A, B = 0.004, 4e-5  # seconds per step, per token


def feed(fit: StepCostFit, windows: list[tuple[int, int]], noise: float = 0.0, seed: int = 0) -> None:
    rng = random.Random(seed)
    steps = tokens = seconds = 0.0
    fit.observe(WorkerCounters())
    for n, t in windows:
        steps, tokens = steps + n, tokens + t
        seconds += (A * n + B * t) * (1 + rng.uniform(-noise, noise))
        fit.observe(WorkerCounters(steps=steps, tokens=tokens, seconds=seconds))


def test_windows_of_different_mixes_separate_step_overhead_from_per_token_cost():
    fit = StepCostFit()
    feed(fit, [(100, 800), (20, 9000), (50, 3000), (200, 1600), (10, 5000)], noise=0.02)
    assert fit.seconds_per_token == pytest.approx(B, rel=0.1)
    assert fit.seconds_per_step == pytest.approx(A, rel=0.2)


def test_windows_all_of_one_mix_give_the_average_cost_per_token():
    fit = StepCostFit()
    feed(fit, [(100, 1000)] * 5)
    assert fit.seconds_per_token == pytest.approx((A * 100 + B * 1000) / 1000)


def test_idle_windows_say_nothing_and_a_restarted_worker_starts_over():
    fit = StepCostFit()
    feed(fit, [(100, 10)] * 3)  # under MIN_WINDOW_TOKENS
    assert fit.seconds_per_token is None
    feed(fit, [(20, 9000), (200, 1600)])
    measured = fit.seconds_per_token
    assert measured is not None
    fit.observe(WorkerCounters(steps=5, tokens=500, seconds=0.1))  # counters went back: a restart
    assert fit._windows == deque()
    fit.observe(WorkerCounters(steps=25, tokens=5500, seconds=0.1 + 20 * A + 5000 * B))
    assert fit.seconds_per_token == pytest.approx((20 * A + 5000 * B) / 5000)


def test_prometheus_text_of_tokenmill_and_vllm_workers():
    text = """# HELP tokenmill_step_tokens Tokens computed per engine step.
# TYPE tokenmill_step_tokens histogram
tokenmill_step_tokens_bucket{le="1.0",model_name="demo"} 3.0
tokenmill_step_tokens_count{model_name="demo"} 120.0
tokenmill_step_tokens_sum{model_name="demo"} 5400.0
tokenmill_step_duration_seconds_sum{model_name="demo"} 1.25
tokenmill_prefix_cache_hits_total{model_name="demo"} 300.0
tokenmill_prefix_cache_queries_total{model_name="demo"} 1000.0
tokenmill_prefix_cache_hits_created{model_name="demo"} 1.7e9
"""
    assert parse_counters(text) == WorkerCounters(120.0, 5400.0, 1.25, 300.0, 1000.0)
    vllm = 'vllm:prefix_cache_hits_total{engine="0"} 5\nvllm:prefix_cache_queries_total{engine="0"} 10\n'
    assert parse_counters(vllm) == WorkerCounters(cache_hits=5.0, cache_queries=10.0)
    assert parse_counters("garbage\n\nx y z\n") == WorkerCounters()
