"""A worker's step costs fitted from its counters; the counters read from Prometheus text."""

from __future__ import annotations

import random
from collections import deque

import pytest

from tokenmill.router.calibration import StepCostFit, WorkerCounters, parse_counters

A, B, C = 0.004, 4e-5, 1e-6  # seconds per step, per token computed, per context token read


def feed(fit: StepCostFit, windows: list[tuple[int, int, int]], noise: float = 0.0, seed: int = 0) -> None:
    rng = random.Random(seed)
    steps = tokens = context = seconds = 0.0
    fit.observe(WorkerCounters())
    for n, t, k in windows:
        steps, tokens, context = steps + n, tokens + t, context + k
        seconds += (A * n + B * t + C * k) * (1 + rng.uniform(-noise, noise))
        fit.observe(WorkerCounters(steps=steps, tokens=tokens, seconds=seconds, context_tokens=context))


MIXED = [(100, 800, 900_000), (20, 9000, 40_000), (50, 3000, 300_000), (200, 1600, 100_000), (10, 5000, 0)]


def test_windows_of_different_mixes_separate_the_three_costs():
    fit = StepCostFit()
    feed(fit, MIXED, noise=0.01)
    assert fit.cost is not None
    assert fit.cost.per_token == pytest.approx(B, rel=0.1)
    assert fit.cost.per_step == pytest.approx(A, rel=0.2)
    assert fit.cost.per_context_token == pytest.approx(C, rel=0.2)


def test_a_worker_without_context_counters_gets_step_and_token_costs():
    fit = StepCostFit()
    feed(fit, [(n, t, 0) for n, t, _ in MIXED])
    assert fit.cost is not None and fit.cost.per_context_token == 0
    assert (fit.cost.per_step, fit.cost.per_token) == pytest.approx((A, B))


def test_windows_all_of_one_mix_give_the_average_cost_per_token():
    fit = StepCostFit()
    feed(fit, [(100, 1000, 50_000)] * 5)
    assert fit.cost is not None and fit.cost.per_step == 0 == fit.cost.per_context_token
    assert fit.seconds_per_token == pytest.approx((A * 100 + B * 1000 + C * 50_000) / 1000)


def test_idle_windows_say_nothing_and_a_restarted_worker_starts_over():
    fit = StepCostFit()
    feed(fit, [(100, 10, 0)] * 3)  # under MIN_WINDOW_TOKENS
    assert fit.cost is None
    feed(fit, MIXED)
    assert fit.cost is not None
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
tokenmill_step_decode_context_tokens_total{model_name="demo"} 77000.0
tokenmill_prefix_cache_hits_total{model_name="demo"} 300.0
tokenmill_prefix_cache_queries_total{model_name="demo"} 1000.0
tokenmill_prefix_cache_hits_created{model_name="demo"} 1.7e9
"""
    assert parse_counters(text) == WorkerCounters(
        120.0, 5400.0, 1.25, 77000.0, 300.0, 1000.0, engine="tokenmill"
    )
    vllm = 'vllm:prefix_cache_hits_total{engine="0"} 5\nvllm:prefix_cache_queries_total{engine="0"} 10\n'
    assert parse_counters(vllm) == WorkerCounters(cache_hits=5.0, cache_queries=10.0, engine="vllm")
    assert parse_counters("garbage\n\nx y z\n") == WorkerCounters()


def test_the_engine_is_known_by_its_metrics_names_and_vllm_gets_priority_the_other_way():
    import json

    from tokenmill.router.gateway import body_for

    assert parse_counters('tokenmill_concurrency_limit{model_name="d"} 8\n').engine == "tokenmill"
    assert parse_counters("# HELP x\nvllm:num_requests_running 3\n").engine == "vllm"
    assert parse_counters("sglang:num_running_reqs 1\n").engine == "sglang"
    assert parse_counters('tokenmill_concurrency_limit{model_name="d"} 8\n').concurrency_limit == 8
    request = {"model": "m", "priority": 7}
    body = json.dumps(request).encode()
    assert json.loads(body_for("vllm", request, body))["priority"] == -7  # vLLM runs lower values first
    assert body_for("tokenmill", request, body) is body
