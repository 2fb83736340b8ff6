"""The gateway's Prometheus metrics: per team and model what the ledger holds, per team what is in
flight, per pool the admission queue; read at scrape time, and as /v1/usage reads them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.router.app import RouterApp
from tokenmill.router.gateway import Gateway
from tokenmill.router.gateway_config import parse_gateway_config
from tokenmill.router.metrics import render
from tokenmill.router.policies import Router
from tokenmill.router.usage_meter import Usage
from tokenmill.router.workers import WorkerPool

CONFIG = {
    "ledger": "usage.db",
    "prices": {"demo": {"prompt": 1.0, "completion": 2.0}},
    "teams": {"search": {"models": ["demo"]}, "idle": {}},
}


def scrape(app: RouterApp) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Each sample of the app's /metrics by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(render(app).decode())
        for s in family.samples
    }


def test_usage_in_flight_and_queues_are_exported_by_team(tmp_path: Path):
    gateway = Gateway(parse_gateway_config(CONFIG, tmp_path))
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"), gateway=gateway)
    key, _ = gateway.create_key("search")
    try:
        raw = json.dumps({"model": "demo", "prompt": "ROMEO:", "max_tokens": 4}).encode()
        admitted = [
            gateway.admit(json.loads(raw), raw, {"authorization": f"Bearer {key}"}, 3, 4) for _ in range(2)
        ]
        before = scrape(app)
        assert before[("tokenmill_gateway_team_in_flight_requests", (("team", "search"),))] == 2
        assert before[("tokenmill_gateway_team_in_flight_requests", (("team", "idle"),))] == 0
        assert not any(name == "tokenmill_gateway_requests_total" for name, _ in before)  # none closed yet
        for a, completion in zip(admitted, (4, 1), strict=True):
            gateway.finish(a, Usage(3, completion, seen=True), "ok", 200, "w")
        after = scrape(app)
        labels = (("model", "demo"), ("team", "search"))
        assert after[("tokenmill_gateway_requests_total", labels)] == 2
        assert after[("tokenmill_gateway_prompt_tokens_total", labels)] == 6
        assert after[("tokenmill_gateway_completion_tokens_total", labels)] == 5
        assert after[("tokenmill_gateway_cost_dollars_total", labels)] == pytest.approx((6 + 2 * 5) / 1e6)
        assert after[("tokenmill_gateway_team_in_flight_requests", (("team", "search"),))] == 0
        (usage,) = gateway.ledger.usage("search", None, None, "model")  # what /v1/usage says
        assert usage["completion_tokens"] == 5

        async def queue_two() -> None:
            queue = gateway.queue("latency", lambda: 1)
            await queue.acquire("search", 0, 1)
            waiting = asyncio.create_task(queue.acquire("search", 0, 1))
            await asyncio.sleep(0)
            seen = scrape(app)
            assert seen[("tokenmill_gateway_queue_waiting_requests", (("pool", "latency"),))] == 1
            assert seen[("tokenmill_gateway_queue_in_flight_requests", (("pool", "latency"),))] == 1
            queue.release(0)
            await waiting
            queue.release(0)

        asyncio.run(queue_two())
        last = scrape(app)
        admitted_labels = (("pool", "latency"), ("team", "search"))
        assert last[("tokenmill_gateway_queue_admitted_total", admitted_labels)] == 2
        assert last[("tokenmill_gateway_queue_refused_total", (("pool", "latency"),))] == 0
    finally:
        gateway.ledger.close()


def test_a_router_without_a_gateway_exports_no_gateway_metrics():
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"))
    assert not any(name.startswith("tokenmill_gateway") for name, _ in scrape(app))
