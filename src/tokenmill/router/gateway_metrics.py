"""The gateway's Prometheus metrics: who used what, read at scrape time (nothing is counted on an
admitted request's path, whose CPU bounds the gateway's latency; a refusal adds one to a tally).

Per team and model, the requests, prompt and completion tokens and dollars of the ledger's totals:
every request the ledger has a row for since it began, so the counters survive a restart, and
agree with ``/v1/usage``. Per team, its requests in flight, and those refused before they had a
usage row (no valid key, a model it may not use, bad input, a limit). Per pool, the admission queue's
waiting and admitted requests and those it refused, and per pool and team what it admitted since
the gateway started.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from tokenmill.router.gateway import Gateway


class GatewayCollector:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        g = self.gateway
        usage = g.ledger.usage(None, None, None, "model")  # (commits this turn's rows first)
        by_model = [
            ("tokenmill_gateway_requests", "Requests with a usage row, by team and model.", "requests"),
            ("tokenmill_gateway_prompt_tokens", "Prompt tokens the workers counted.", "prompt_tokens"),
            ("tokenmill_gateway_completion_tokens", "Completion tokens generated.", "completion_tokens"),
            ("tokenmill_gateway_cost_dollars", "Cost at the config's prices.", "cost"),
        ]
        for name, doc, key in by_model:
            family = CounterMetricFamily(name, doc, labels=["team", "model"])
            for row in usage:
                family.add_metric([row["team"], row["model"]], float(row[key]))
            yield family
        in_flight = GaugeMetricFamily(
            "tokenmill_gateway_team_in_flight_requests", "The team's requests in flight.", labels=["team"]
        )
        for team in sorted(g.teams):
            in_flight.add_metric([team], float(g.limiter.in_flight(team)))
        yield in_flight
        turned_away = CounterMetricFamily(
            "tokenmill_gateway_refused_requests",
            "Completion requests the gateway refused before they had a usage row, since it started: by "
            'team and reason (key: no valid key, team ""; model; invalid_request; or the limit).',
            labels=["team", "reason"],
        )
        for (team, reason), n in sorted(g.refused.items()):
            turned_away.add_metric([team, reason], float(n))
        yield turned_away
        waiting = GaugeMetricFamily(
            "tokenmill_gateway_queue_waiting_requests", "Requests waiting for a slot.", labels=["pool"]
        )
        running = GaugeMetricFamily(
            "tokenmill_gateway_queue_in_flight_requests", "Requests holding a slot.", labels=["pool"]
        )
        refused = CounterMetricFamily(
            "tokenmill_gateway_queue_refused", "Requests the queue refused (full, or waited too long).",
            labels=["pool"],
        )  # fmt: skip
        admitted = CounterMetricFamily(
            "tokenmill_gateway_queue_admitted", "Requests the queue admitted.", labels=["pool", "team"]
        )
        for pool, queue in sorted(g.queues.items()):
            waiting.add_metric([pool], float(queue.waiting))
            running.add_metric([pool], float(queue.in_flight))
            refused.add_metric([pool], float(queue.refused))
            for team, n in sorted(queue.admitted_by_team.items()):
                admitted.add_metric([pool, team], float(n))
        yield from (waiting, running, refused, admitted)
