"""The gateway's YAML: teams, limits, prices; every mistake named by its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.router.gateway_config import Budget, GatewayConfigError, Price, load_gateway_config

GOOD = """
ledger: usage.db
prices:
  demo: {prompt: 0.1, completion: 0.4}
teams:
  search:
    models: [demo]
    priority: 10
    requests_per_minute: 600
    tokens_per_minute: 200000
    max_parallel: 32
    budget: {tokens: 100000000, period: month}
    pool: latency
  batch: {}
"""


def test_a_full_config_parses(tmp_path: Path):
    (tmp_path / "g.yaml").write_text(GOOD)
    config = load_gateway_config(tmp_path / "g.yaml")
    assert config.ledger == tmp_path / "usage.db" and config.default_max_tokens == 1024
    search = config.teams["search"]
    assert (search.priority, search.requests_per_minute, search.tokens_per_minute, search.max_parallel) == (
        10,
        600,
        200_000,
        32,
    )
    assert search.budget == Budget("month", tokens=100_000_000) and search.pool == "latency"
    assert search.allows("demo") and not search.allows("other")
    batch = config.teams["batch"]
    assert batch.allows("anything") and batch.priority == 0 and batch.requests_per_minute is None
    assert config.price("demo") == Price(0.1, 0.4) and config.price("other") is None
    assert Price(0.1, 0.4).cost(1_000_000, 500_000) == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("yaml", "named"),
    [
        ("teams: {a: {pool: fast}}", "teams.a.pool must be one of latency, throughput"),
        ("teams: {a: {priority: high}}", "teams.a.priority must be an integer"),
        ("teams: {a: {requests_per_minute: 0}}", "teams.a.requests_per_minute must be a whole number >= 1"),
        ("teams: {a: {budget: {tokens: 5, dollars: 1}}}", "teams.a.budget takes one of tokens or dollars"),
        (
            "teams: {a: {budget: {tokens: 5, period: year}}}",
            "teams.a.budget.period must be one of day, week, month",
        ),
        ("teams: {a: {modles: [x]}}", "teams.a has unknown fields ['modles']"),
        ("teams: {a: {models: []}}", "teams.a.models must be a list"),
        ("prices: {m: {prompt: -1}}", "prices.m.prompt must be a number >= 0"),
        ("ledgr: x.db", "the gateway config has unknown fields ['ledgr']"),
        ("teams: [a, b]", "teams must be a mapping"),
        ("a: [", "is not valid YAML"),
    ],
)
def test_mistakes_name_the_field_and_what_it_allows(tmp_path: Path, yaml: str, named: str):
    (tmp_path / "g.yaml").write_text(yaml)
    with pytest.raises(GatewayConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_gateway_config(tmp_path / "g.yaml")
