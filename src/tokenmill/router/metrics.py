"""The router's Prometheus metrics, read from its live state at scrape time (no bookkeeping twice).

Per worker: requests and tokens routed, requests and tokens in flight, failures,
health, prompt tokens a cache-aware policy expected cached there beside the
hit rate the worker reports, its measured prefill speed and the KV blocks its
events say it holds; per decision reason: routing decisions; fleet: the
imbalance gauge (max / mean of in-flight tokens over available workers) and
the prompt tokens expected cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from tokenmill.router.app import RouterApp

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RouterCollector:
    def __init__(self, app: RouterApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        pool, router = self.app.pool, self.app.router
        workers = pool.workers
        counter, gauge = CounterMetricFamily, GaugeMetricFamily
        per_worker = [
            ("tokenmill_router_requests", "Requests routed to the worker.", "routed", counter),
            (
                "tokenmill_router_tokens",
                "Prompt + asked output tokens of requests the worker accepted (estimate).",
                "routed_tokens",
                counter,
            ),
            ("tokenmill_router_failures", "Connection errors and 5xx from the worker.", "failed", counter),
            ("tokenmill_router_in_flight_requests", "Requests in flight at the worker.", "in_flight", gauge),
            (
                "tokenmill_router_in_flight_tokens",
                "Tokens in flight there (estimate).",
                "in_flight_tokens",
                gauge,
            ),
        ]
        for name, doc, attr, kind in per_worker:
            family = kind(name, doc, labels=["worker"])
            for w in workers:
                family.add_metric([w.name], float(getattr(w, attr)))
            yield family
        predicted = CounterMetricFamily(
            "tokenmill_router_predicted_cached_tokens_by_worker",
            "Prompt tokens a cache-aware policy expected cached where it sent them.",
            labels=["worker"],
        )
        measured = GaugeMetricFamily(
            "tokenmill_router_worker_prefix_cache_hit_ratio",
            "Prefix-cache hit rate the worker itself reports (its /metrics).",
            labels=["worker"],
        )
        rate = GaugeMetricFamily(
            "tokenmill_router_worker_prefill_tokens_per_second",
            "Prefill speed measured from the worker's step metrics.",
            labels=["worker"],
        )
        known = GaugeMetricFamily(
            "tokenmill_router_worker_kv_blocks",
            "KV blocks the worker's events say it holds.",
            labels=["worker"],
        )
        for w in workers:
            predicted.add_metric([w.name], float(w.predicted_hit_tokens))
            hit_rate = w.measured_hit_rate
            if hit_rate is not None:
                measured.add_metric([w.name], hit_rate)
            if w.step_cost.seconds_per_token:
                rate.add_metric([w.name], 1 / w.step_cost.seconds_per_token)
            known.add_metric([w.name], float(router.kv.num_blocks(w.url)))
        yield from (predicted, measured, rate, known)
        healthy = GaugeMetricFamily(
            "tokenmill_router_worker_up", "1 if the worker takes requests.", labels=["worker"]
        )
        for w in workers:
            healthy.add_metric([w.name], 1.0 if w.available else 0.0)
        yield healthy
        decisions = CounterMetricFamily(
            "tokenmill_router_decisions", "Routing decisions by reason.", labels=["reason"]
        )
        for reason, n in sorted(router.decisions.items()):
            decisions.add_metric([reason], float(n))
        yield decisions
        imbalance = "max / mean in-flight tokens over available workers."
        yield gauge("tokenmill_router_imbalance_ratio", imbalance, value=pool.imbalance())
        predicted = "Prompt tokens the prefix policy expected cached."
        yield counter(
            "tokenmill_router_predicted_cached_tokens", predicted, value=float(router.predicted_hit_tokens)
        )
        cut = "Streams ended with an error event because their worker failed."
        yield counter("tokenmill_router_streams_cut", cut, value=float(self.app.streams_cut))


def render(app: RouterApp) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RouterCollector(app))  # type: ignore[arg-type]
    if app.gateway is not None:
        from tokenmill.router.gateway_metrics import GatewayCollector

        registry.register(GatewayCollector(app.gateway))  # type: ignore[arg-type]
    return generate_latest(registry)
