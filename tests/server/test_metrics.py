"""ServingMetrics fed by hand: what each engine event turns into on /metrics."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.engine.stats import EngineStats, StepRecord
from tokenmill.server import metrics as metrics_module
from tokenmill.server.metrics import ServingMetrics


def stats(**kw) -> EngineStats:
    base = dict(
        num_running=3,
        num_waiting=2,
        kv_blocks_used=25,
        kv_blocks_total=100,
        num_cached_blocks=7,
        prefix_cache_queries=400,
        prefix_cache_hits=100,
        num_preemptions=1,
        num_steps=10,
        last_step_seconds=0.01,
        busy_seconds=1.5,
        num_prompt_tokens=300,
        num_generated_tokens=90,
        max_num_seqs=4,
    )
    return EngineStats(**{**base, **kw})


def finished(reason: str, priority: int = 0) -> RequestOutput:
    m = RequestMetrics(
        arrival_time=10.0,
        first_scheduled_time=10.5,
        first_token_time=11.0,
        last_token_time=11.3,
        finished_time=11.3,
        num_output_tokens=4,
        token_times=[11.0, 11.1, 11.2, 11.3],
        priority=priority,
    )
    return RequestOutput("r", None, [1, 2], [CompletionOutput(0, "x", [5], reason)], True, m)


def samples(m: ServingMetrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_gauges_and_counters_come_from_engine_stats_at_scrape_time():
    m = ServingMetrics("llama", token_budget=2048)
    current = [stats()]
    m.watch(lambda: current[0], lambda: 6)
    s = samples(m)
    assert s["tokenmill_requests_running"] == 3 and s["tokenmill_requests_waiting"] == 2
    assert s["tokenmill_requests_in_flight"] == 6
    assert s["tokenmill_kv_cache_usage_ratio"] == 0.25
    assert s["tokenmill_concurrency_utilization_ratio"] == 0.75 and s["tokenmill_concurrency_limit"] == 4
    assert s["tokenmill_prefix_cache_hits_total"] == 100 and s["tokenmill_prefix_cache_queries_total"] == 400
    assert s["tokenmill_generation_tokens_total"] == 90 and s["tokenmill_prompt_tokens_total"] == 300
    assert not any(k.startswith("vllm:") for k in s)  # only with vllm_names
    current[0] = stats(num_running=1)
    assert samples(m)["tokenmill_requests_running"] == 1  # never stale


def test_request_histograms_and_finish_reasons():
    m = ServingMetrics("llama", token_budget=2048, vllm_names=True)
    m.watch(stats)
    m.on_request_finished(finished("length", priority=2))
    m.on_request_finished(finished("abort"))
    s = samples(m)
    assert s["tokenmill_requests_total{finished_reason=length}"] == 1
    assert s["tokenmill_requests_total{finished_reason=abort}"] == 1
    assert s["vllm:request_success_total{finished_reason=length}"] == 1
    assert s["tokenmill_requests_by_priority_total{priority=2}"] == 1
    assert s["tokenmill_time_to_first_token_seconds_count"] == 2
    assert s["tokenmill_time_to_first_token_seconds_sum"] == 2.0  # 1 s each
    assert s["tokenmill_inter_token_latency_seconds_count"] == 6  # 3 gaps each
    assert s["tokenmill_e2e_request_latency_seconds_sum"] == pytest.approx(2 * 1.3)
    assert s["tokenmill_request_queue_time_seconds_sum"] == pytest.approx(1.0)
    assert s["vllm:time_to_first_token_seconds_count"] == 2
    assert s["vllm:kv_cache_usage_perc"] == s["vllm:gpu_cache_usage_perc"] == 0.25
    assert s["vllm:num_requests_waiting"] == 2


def test_steps_feed_the_budget_histogram_and_the_busy_ratio(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    m = ServingMetrics("llama", token_budget=512)
    m.watch(stats)
    clock[0] += 20.0  # the worker has been up longer than the window
    for _ in range(4):  # 4 steps of 0.5 s within the last 10 s: busy 20% of the time
        clock[0] += 1.0
        m.on_step(StepRecord(0.5, 256, 512, 8, 200, 8), stats())
    s = samples(m)
    assert s["tokenmill_engine_busy_ratio"] == 0.2
    assert s["tokenmill_step_budget_utilization_ratio_count"] == 4
    assert s["tokenmill_step_budget_utilization_ratio_bucket{le=0.5}"] == 4
    assert s["tokenmill_step_budget_utilization_ratio_bucket{le=0.4}"] == 0
    assert s["tokenmill_step_tokens_bucket{le=512.0}"] == 4 and s["tokenmill_step_tokens_sum"] == 1024
    clock[0] += 30.0  # then idle: the window forgets old steps
    assert samples(m)["tokenmill_engine_busy_ratio"] == 0.0


def test_priority_series_are_bounded_whatever_clients_send():
    m = ServingMetrics("llama", token_budget=2048)
    m.watch(stats)
    for p in range(metrics_module.PRIORITY_LABELS + 50):
        m.on_request_finished(finished("stop", priority=p))
    m.on_request_finished(finished("stop", priority=0))  # a value seen early keeps its own series
    s = samples(m)
    series = [k for k in s if k.startswith("tokenmill_requests_by_priority_total")]
    assert len(series) == metrics_module.PRIORITY_LABELS + 1  # and "other"
    assert s["tokenmill_requests_by_priority_total{priority=other}"] == 50
    assert s["tokenmill_requests_by_priority_total{priority=0}"] == 2
