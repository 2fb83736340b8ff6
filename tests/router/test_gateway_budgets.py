"""The gateway's limits and budgets through real HTTP on loopback, in front of a demo worker: what a
request may use is what it reserved, whatever it names or leaves out."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.router.test_gateway import ADMIN, create_key, start_gateway, usage_rows

CONFIG = """
ledger: usage.db
prices:
  demo: {prompt: 1.0, completion: 2.0}
teams:
  nomax: {tokens_per_minute: 1000, budget: {tokens: 1000, period: day}}
  anymodel: {budget: {dollars: 5, period: day}}
  listed: {models: [demo, foo], budget: {dollars: 5, period: day}}
  unbudgeted: {models: ["*"]}
"""


@pytest.fixture
def gateway(worker, tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    keys = {team: create_key(config, team) for team in ("nomax", "anymodel", "listed", "unbudgeted")}
    router = start_gateway(worker, config)
    yield type("G", (), {"url": router.url, "router": router, "keys": keys, "config": config})
    router.stop()


def post(gateway, team: str, path: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {gateway.keys[team]}"}
    return httpx.post(f"{gateway.url}{path}", json={"model": "demo", **body}, headers=headers, timeout=60)


def test_a_request_naming_no_max_tokens_uses_no_more_than_it_reserved(gateway):
    """The QA repro: n 3 without max_tokens reserved 332 tokens a sequence of a 1,000-token minute
    and day, and generated to the end of the context for each: 3,044 tokens."""
    messages = [{"role": "user", "content": "Hi"}]
    done = post(gateway, "nomax", "/v1/chat/completions", {"messages": messages, "n": 3, "ignore_eos": True})
    assert done.status_code == 200, done.text
    usage = done.json()["usage"]
    assert usage["total_tokens"] <= 1000 and usage["completion_tokens"] % 3 == 0, usage
    (row,) = usage_rows(gateway, "nomax")
    assert row["prompt_tokens"] + row["completion_tokens"] <= 1000
    headers = {"authorization": f"Bearer {ADMIN}"}
    (total,) = httpx.get(f"{gateway.url}/v1/usage?team=nomax", headers=headers, timeout=30).json()["data"]
    assert total["total_tokens"] <= 1000


def test_a_dollar_budget_team_may_not_use_a_model_without_a_price(gateway):
    """The QA repro: a team with a dollar budget used a model with no price (and no "*" price)
    without limit, its cost 0.0. Refused now, and the operator is told at start."""
    log = " ".join(gateway.router.log_before_ready.split())
    assert "team anymodel has a dollar budget and may use any model" in log
    assert "team listed has a dollar budget, but its models foo have no price" in log
    assert "unbudgeted" not in log and "nomax" not in log
    for team in ("anymodel", "listed"):
        refused = post(gateway, team, "/v1/completions", {"model": "foo", "prompt": "Hi", "max_tokens": 2})
        error = refused.json()["error"]
        assert refused.status_code == 403 and error["param"] == "model", refused.text
        assert "no price in the gateway config" in error["message"] and "dollar budget" in error["message"]
        ok = post(gateway, team, "/v1/completions", {"model": "demo", "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    free = post(gateway, "unbudgeted", "/v1/completions", {"model": "foo", "prompt": "Hi", "max_tokens": 2})
    assert free.status_code == 404  # no budget to keep: the worker's answer (it serves demo only)
    assert usage_rows(gateway, "anymodel")[0]["model"] == "demo"  # the refusal cost nothing
