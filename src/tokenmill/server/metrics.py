"""Prometheus metrics of one worker: load, latency, and how much of the hardware is used.

Gauges and counters that the engine already keeps (running, waiting, KV usage,
prefix-cache hits, tokens) are read from ``EngineStats`` at scrape time, so they
are never stale and cost nothing per request. Histograms are fed by the engine's
listener hooks: one call per step and one per finished request, in the engine's
thread (prometheus-client is thread-safe).

With ``vllm_names=True`` the same figures are exported a second time under
vLLM's names (``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ...)
so routers and dashboards built for vLLM read tokenmill workers unchanged.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.stats import EngineStats, StepRecord

BUSY_WINDOW_S = 10.0  # tokenmill_engine_busy_ratio looks this far back
PRIORITY_LABELS = 32  # distinct priorities with a series of their own (a deployment uses a handful)

# Latency buckets: from a fast GPU decode step to a long queue wait.
_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
_ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def _token_buckets(budget: int) -> tuple[float, ...]:
    """Powers of two up to the step budget, and the budget itself."""
    edges, b = [], 1
    while b < budget:
        edges.append(float(b))
        b *= 2
    edges.append(float(budget))
    return tuple(edges)


class _Pair:
    """One figure under tokenmill's name and, optionally, under vLLM's."""

    def __init__(self, *metrics: Histogram | Counter):
        self.metrics = [m for m in metrics if m is not None]

    def observe(self, value: float, **labels: str) -> None:
        for m in self.metrics:
            (m.labels(**labels) if labels else m).observe(value)  # type: ignore[union-attr]

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        for m in self.metrics:
            (m.labels(**labels) if labels else m).inc(amount)  # type: ignore[union-attr]


class ServingMetrics:
    """The worker's metrics; an ``EngineListener`` for the ``AsyncEngine`` it watches."""

    def __init__(self, model_name: str, token_budget: int, vllm_names: bool = False):
        self.model_name = model_name
        self.vllm_names = vllm_names
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats: EngineStats | None = None
        self._stats_source: Callable[[], EngineStats] | None = None  # set by watch()
        self._in_flight_source: Callable[[], int] | None = None
        self._busy_lock = threading.Lock()
        self._busy: deque[tuple[float, float]] = deque()  # (end time, seconds) of recent steps
        self._started = time.monotonic()

        def hist(name: str, doc: str, buckets: tuple[float, ...], vllm: str | None, labels=("model_name",)):
            ours = Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry)
            theirs = (
                Histogram(vllm, doc, list(labels), buckets=buckets, registry=self.registry)
                if vllm and vllm_names
                else None
            )
            return _Pair(ours, theirs)

        self.ttft = hist(
            "tokenmill_time_to_first_token_seconds",
            "Time to first token.",
            _LATENCY_BUCKETS,
            "vllm:time_to_first_token_seconds",
        )
        self.itl = hist(
            "tokenmill_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            _ITL_BUCKETS,
            "vllm:inter_token_latency_seconds",
        )
        self.tpot = hist(
            "tokenmill_time_per_output_token_seconds",
            "Per request: (last token - first token) / (output tokens - 1).",
            _ITL_BUCKETS,
            "vllm:time_per_output_token_seconds",
        )
        self.e2e = hist(
            "tokenmill_e2e_request_latency_seconds",
            "Arrival to last token.",
            _LATENCY_BUCKETS,
            "vllm:e2e_request_latency_seconds",
        )
        self.queue = hist(
            "tokenmill_request_queue_time_seconds",
            "Arrival to first scheduled.",
            _LATENCY_BUCKETS,
            "vllm:request_queue_time_seconds",
        )
        self.step_tokens = hist(
            "tokenmill_step_tokens", "Tokens computed per engine step.", _token_buckets(token_budget), None
        )
        self.step_budget = hist(
            "tokenmill_step_budget_utilization_ratio",
            "Tokens per step over the step's token budget (max_num_batched_tokens).",
            _RATIO_BUCKETS,
            None,
        )
        self.step_seconds = hist(
            "tokenmill_step_duration_seconds", "Wall time of one engine step.", _ITL_BUCKETS, None
        )
        finished = Counter(
            "tokenmill_requests",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        vllm_finished = (
            Counter(
                "vllm:request_success",
                "Finished requests by finish reason.",
                ["model_name", "finished_reason"],
                registry=self.registry,
            )
            if vllm_names
            else None
        )
        self.finished = _Pair(finished, vllm_finished)
        self.step_context = _Pair(
            Counter(
                "tokenmill_step_decode_context_tokens",
                "Context tokens decodes attended to, over all steps (what a step's KV reads cost).",
                ["model_name"],
                registry=self.registry,
            )
        )
        self.by_priority = _Pair(
            Counter(
                "tokenmill_requests_by_priority",
                "Finished requests by priority.",
                ["model_name", "priority"],
                registry=self.registry,
            )
        )
        self._priority_labels: dict[int, str] = {}
        self.token_budget = token_budget
        self.registry.register(_StatsCollector(self))

    # -- wiring --------------------------------------------------------------------

    def watch(
        self, stats_source: Callable[[], EngineStats], in_flight_source: Callable[[], int] | None = None
    ) -> None:
        """Read gauges from ``stats_source()`` (an ``AsyncEngine.stats``) at every scrape."""
        self._stats_source = stats_source
        self._in_flight_source = in_flight_source

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics."""
        return generate_latest(self.registry)

    # -- EngineListener ----------------------------------------------------------------

    def _priority_label(self, priority: int) -> str:
        """The priority as a label value: the first ``PRIORITY_LABELS`` values seen get their own
        series, any later one counts under ``other``, so no client can grow /metrics without end."""
        if priority in self._priority_labels:
            return self._priority_labels[priority]
        if len(self._priority_labels) >= PRIORITY_LABELS:
            return "other"
        label = self._priority_labels[priority] = str(priority)
        return label

    def on_step(self, record: StepRecord, stats: EngineStats) -> None:
        labels = {"model_name": self.model_name}
        self.step_tokens.observe(record.num_scheduled_tokens, **labels)
        self.step_budget.observe(record.budget_utilization, **labels)
        self.step_seconds.observe(record.seconds, **labels)
        self.step_context.inc(record.num_decode_context_tokens, **labels)
        now = time.monotonic()
        with self._busy_lock:
            self._busy.append((now, record.seconds))
            while self._busy and self._busy[0][0] < now - BUSY_WINDOW_S:
                self._busy.popleft()

    def on_request_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        labels = {"model_name": self.model_name}
        reasons = {c.finish_reason or "abort" for c in output.outputs}
        reason = "abort" if "abort" in reasons else ("length" if "length" in reasons else "stop")
        self.finished.inc(**labels, finished_reason=reason)
        self.by_priority.inc(**labels, priority=self._priority_label(m.priority))
        if m.queue_time is not None:
            self.queue.observe(max(0.0, m.queue_time), **labels)
        if m.time_to_first_token is not None:
            self.ttft.observe(max(0.0, m.time_to_first_token), **labels)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap, **labels)
        if m.mean_inter_token_latency is not None:
            self.tpot.observe(m.mean_inter_token_latency, **labels)
        end = m.finished_time if m.finished_time is not None else m.last_token_time
        if end is not None:
            self.e2e.observe(max(0.0, end - m.arrival_time), **labels)

    # -- read at scrape time --------------------------------------------------------------

    def busy_ratio(self) -> float:
        """Share of the last BUSY_WINDOW_S seconds the engine spent in steps."""
        now = time.monotonic()
        window = min(BUSY_WINDOW_S, max(now - self._started, 1e-9))
        with self._busy_lock:
            busy = sum(s for end, s in self._busy if end >= now - window)
        return min(1.0, busy / window)

    def stats(self) -> EngineStats | None:
        return self._stats_source() if self._stats_source is not None else None


class _StatsCollector(Collector):
    def __init__(self, metrics: ServingMetrics):
        self.m = metrics

    def describe(self) -> list:
        return []  # unchecked collector: families come from collect()

    def collect(self) -> Iterator:
        stats = self.m.stats()
        if stats is None:
            return
        name = self.m.model_name
        vllm = self.m.vllm_names
        seats = stats.max_num_seqs or 1
        gauges = [
            (
                "tokenmill_requests_running",
                "vllm:num_requests_running",
                "Requests in the running batch.",
                stats.num_running,
            ),
            (
                "tokenmill_requests_waiting",
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled.",
                stats.num_waiting,
            ),
            (
                "tokenmill_kv_cache_usage_ratio",
                "vllm:kv_cache_usage_perc",
                "Share of KV cache blocks in use (0-1).",
                stats.kv_cache_usage,
            ),
            (
                "tokenmill_engine_busy_ratio",
                None,
                f"Share of the last {BUSY_WINDOW_S:.0f} s spent in engine steps (0-1).",
                self.m.busy_ratio(),
            ),
            (
                "tokenmill_concurrency_utilization_ratio",
                None,
                "Running requests over the concurrency limit (max_num_seqs).",
                stats.num_running / seats,
            ),
            (
                "tokenmill_concurrency_limit",
                None,
                "Most requests that run at once (max_num_seqs).",
                stats.max_num_seqs,
            ),
            ("tokenmill_kv_cache_blocks", None, "KV cache blocks in the pool.", stats.kv_blocks_total),
        ]
        if vllm:  # vLLM v0's name for KV usage, still read by older routers
            gauges.append(
                (
                    None,
                    "vllm:gpu_cache_usage_perc",
                    "Share of KV cache blocks in use (0-1).",
                    stats.kv_cache_usage,
                )
            )
        if self.m._in_flight_source is not None:
            gauges.append(
                (
                    "tokenmill_requests_in_flight",
                    None,
                    "Requests accepted by this worker and not finished (queued, waiting or running).",
                    self.m._in_flight_source(),
                )
            )
        counters = [
            (
                "tokenmill_prefix_cache_queries",
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            (
                "tokenmill_prefix_cache_hits",
                "vllm:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits,
            ),
            ("tokenmill_preemptions", "vllm:num_preemptions", "Requests preempted.", stats.num_preemptions),
            (
                "tokenmill_prompt_tokens",
                "vllm:prompt_tokens",
                "Prompt tokens computed by prefill.",
                stats.num_prompt_tokens,
            ),
            (
                "tokenmill_generation_tokens",
                "vllm:generation_tokens",
                "Tokens generated.",
                stats.num_generated_tokens,
            ),
            ("tokenmill_engine_busy_seconds", None, "Wall time spent in engine steps.", stats.busy_seconds),
            ("tokenmill_engine_steps", None, "Engine steps taken.", stats.num_steps),
        ]
        for ours, theirs, doc, value in gauges:
            for metric_name in (ours, theirs if vllm else None):
                if metric_name:
                    g = GaugeMetricFamily(metric_name, doc, labels=["model_name"])
                    g.add_metric([name], float(value))
                    yield g
        for ours, theirs, doc, value in counters:
            for metric_name in (ours, theirs if vllm else None):
                if metric_name:
                    c = CounterMetricFamily(metric_name, doc, labels=["model_name"])
                    c.add_metric([name], float(value))
                    yield c
