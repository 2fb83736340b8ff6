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
from tokenmill.router.gateway_request import GatewayError
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


def test_requests_refused_before_a_usage_row_are_counted_by_team_and_reason(tmp_path: Path):
    teams = {"search": {"models": ["demo"], "requests_per_minute": 1}, "idle": {}}
    gateway = Gateway(parse_gateway_config({**CONFIG, "teams": teams}, tmp_path))
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"), gateway=gateway)
    key, _ = gateway.create_key("search")
    auth = {"authorization": f"Bearer {key}"}

    def admit(body: dict, headers: dict[str, str]):
        raw = json.dumps(body).encode()
        return gateway.admit(json.loads(raw), raw, dict(headers), 3, 4)

    def refused(body: dict, headers: dict[str, str]) -> int:
        with pytest.raises(GatewayError) as e:
            admit(body, headers)
        return e.value.status

    ask = {"model": "demo", "prompt": "ROMEO:", "max_tokens": 4}
    try:
        first = admit(ask, auth)  # the minute's one request
        assert refused(ask, auth) == 429
        assert refused({**ask, "model": "other"}, auth) == 403
        assert refused({**ask, "metadata": ["not", "tags"]}, auth) == 400
        assert refused(ask, {}) == 401
        assert refused(ask, {"authorization": "Bearer made-up"}) == 401
        gateway.finish(first, Usage(3, 4, seen=True), "ok", 200, "w")
        seen = scrape(app)
        name = "tokenmill_gateway_refused_requests_total"
        assert {labels: n for (metric, labels), n in seen.items() if metric == name} == {
            (("reason", "requests_per_minute"), ("team", "search")): 1,
            (("reason", "model"), ("team", "search")): 1,
            (("reason", "invalid_request"), ("team", "search")): 1,
            (("reason", "key"), ("team", "")): 2,
        }
        # refused before a usage row: the ledger holds the one admitted request alone
        assert seen[("tokenmill_gateway_requests_total", (("model", "demo"), ("team", "search")))] == 1
    finally:
        gateway.ledger.close()


def posted(app: RouterApp, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST /v1/chat/completions through the app's ASGI interface: the status and error answered."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": raw_headers,
    }
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])["error"]


def test_a_body_that_is_no_json_object_is_refused_after_the_key_and_counted(tmp_path: Path):
    """Such a body got a 400 before the key was looked at (so to callers without one too), and
    was counted nowhere."""
    gateway = Gateway(parse_gateway_config(CONFIG, tmp_path))
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"), gateway=gateway)
    key, _ = gateway.create_key("search")
    try:
        for body in (b"{bad json", b"[1, 2]", b'"text"'):
            status, error = posted(app, body, {})
            assert (status, error["type"]) == (401, "authentication_error")
            status, error = posted(app, body, {"authorization": f"Bearer {key}"})
            assert (status, error["type"]) == (400, "invalid_request_error") and "JSON" in error["message"]
        seen = scrape(app)
        name = "tokenmill_gateway_refused_requests_total"
        assert seen[(name, (("reason", "invalid_request"), ("team", "search")))] == 3
        assert seen[(name, (("reason", "key"), ("team", "")))] == 3
    finally:
        gateway.ledger.close()


def test_a_router_without_a_gateway_exports_no_gateway_metrics():
    app = RouterApp(WorkerPool(["http://127.0.0.1:9"]), Router("least_load"))
    assert not any(name.startswith("tokenmill_gateway") for name, _ in scrape(app))
