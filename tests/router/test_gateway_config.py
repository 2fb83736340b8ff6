"""The gateway's YAML: teams, limits, prices; every mistake named by its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.router.gateway_config import (
    Budget,
    GatewayConfigError,
    Price,
    load_gateway_config,
    parse_gateway_config,
    parse_label,
    parse_team,
)

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
        (
            "teams: {a: {requests_per_minute: 0}}",
            "teams.a.requests_per_minute must be a whole number from 1 to 9007199254740991",
        ),
        ("teams: {a: {budget: {tokens: 5, dollars: 1}}}", "teams.a.budget takes one of tokens or dollars"),
        (
            "teams: {a: {budget: {tokens: 5, period: year}}}",
            "teams.a.budget.period must be one of day, week, month",
        ),
        ("teams: {a: {modles: [x]}}", "teams.a has unknown fields ['modles']"),
        ("teams: {a: {models: []}}", "teams.a.models must be a list"),
        ("prices: {m: {prompt: -1}}", "prices.m.prompt must be a number from 0 to 1e"),
        ("ledgr: x.db", "the gateway config has unknown fields ['ledgr']"),
        ("teams: [a, b]", "teams must be a mapping"),
        ("a: [", "is not valid YAML"),
    ],
)
def test_mistakes_name_the_field_and_what_it_allows(tmp_path: Path, yaml: str, named: str):
    (tmp_path / "g.yaml").write_text(yaml)
    with pytest.raises(GatewayConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_gateway_config(tmp_path / "g.yaml")


def _refused(yaml: str, tmp_path: Path) -> GatewayConfigError:
    (tmp_path / "g.yaml").write_text(yaml)
    with pytest.raises(GatewayConfigError) as refused:
        load_gateway_config(tmp_path / "g.yaml")
    return refused.value


@pytest.mark.parametrize(
    ("yaml", "field", "named"),
    [
        # The ledger keeps a request's priority as a 64-bit INTEGER and workers as int32: a class
        # past that used to be accepted, and every usage row of the team then dropped.
        (
            "teams: {a: {priority: 99999999999999999999999}}",
            "teams.a.priority",
            "from -2147483648 to 2147483647",
        ),
        ("teams: {a: {priority: 2147483648}}", "teams.a.priority", "from -2147483648 to 2147483647"),
        ("teams: {a: {priority: -2147483649}}", "teams.a.priority", "from -2147483648 to 2147483647"),
        ("teams: {a: {requests_per_minute: 9007199254740992}}", "teams.a.requests_per_minute", "1 to 9007"),
        ("teams: {a: {tokens_per_minute: 1" + "0" * 400 + "}}", "teams.a.tokens_per_minute", "1 to 9007"),
        ("teams: {a: {max_parallel: 1" + "0" * 30 + "}}", "teams.a.max_parallel", "1 to 9007"),
        ("teams: {a: {budget: {tokens: 1" + "0" * 30 + "}}}", "teams.a.budget.tokens", "1 to 9007"),
        # An int past a float's range raised OverflowError (a traceback) where it was converted.
        ("teams: {a: {weight: 1" + "0" * 400 + "}}", "teams.a.weight", "> 0 and <= 1000000"),
        ("teams: {a: {weight: 0}}", "teams.a.weight", "> 0 and <= 1000000"),
        ("teams: {a: {budget: {dollars: 1" + "0" * 400 + "}}}", "teams.a.budget.dollars", "from 0 to 1e+15"),
        ("prices: {m: {prompt: 1" + "0" * 400 + "}}", "prices.m.prompt", "from 0 to 1e+15"),
        ("queue: {max_wait_s: 1" + "0" * 400 + "}", "queue.max_wait_s", "from 0 to 1e+15"),
        # overflow is a share of the slots (admission.py): 50 would let 50x the slots past full.
        ("queue: {overflow: 50}", "queue.overflow", "from 0 to 1"),
        ("usage_checkpoint_s: 0", "usage_checkpoint_s", "must be > 0 (seconds, at most 3600)"),
        ("usage_checkpoint_s: 86400", "usage_checkpoint_s", "from 0 to 3600"),
        # Absent, default_max_tokens is 1024 (not "no limit"); empty, it is a mistake.
        ("default_max_tokens: 0", "default_max_tokens", "(or absent: 1024), got 0"),
        ("default_max_tokens:", "default_max_tokens", '(or absent: 1024), got "nothing"'),
        ("worker_slots:", "worker_slots", "(or absent: 64)"),
        ("queue: {max_waiting: -1}", "queue.max_waiting", "(or absent: 1000)"),
        ("ledger:", "ledger", "ledger must be the SQLite file's path"),  # (made a file named None)
        ("ledger: ''", "ledger", "ledger must be the SQLite file's path"),
        ("ledger: 5", "ledger", "ledger must be the SQLite file's path"),
        ("teams: {a/b: {}}", "teams", "the team name 'a/b' must be 1-64 characters from A-Z a-z 0-9 - _ ."),
        ("teams: {..: {}}", "teams", "starting with a letter or digit"),
        ("teams: {" + "x" * 65 + ": {}}", "teams", "must be 1-64 characters"),
        ("teams: {~: {}}", "teams", "the team name '~' must be"),  # (YAML's null, read as written)
        ('teams: {a: {models: ["m\\ud800"]}}', "teams.a.models", "unpaired"),
    ],
)
def test_values_the_ledger_limiter_or_urls_cannot_hold_are_refused(tmp_path: Path, yaml, field, named):
    refused = _refused(yaml, tmp_path)
    assert named in str(refused) and refused.field == field


def test_the_edges_of_each_range_are_accepted(tmp_path: Path):
    yaml = """
queue: {overflow: 1}
usage_checkpoint_s: 3600
teams:
  low: {priority: -2147483648, weight: 1000000}
  high.team-1_x: {priority: 2147483647, tokens_per_minute: 9007199254740991}
  "0": {budget: {tokens: 9007199254740991}}
  123: {}
"""
    (tmp_path / "g.yaml").write_text(yaml)
    config = load_gateway_config(tmp_path / "g.yaml")
    assert config.overflow == 1.0 and set(config.teams) == {"low", "high.team-1_x", "0", "123"}
    assert config.usage_checkpoint_s == 3600.0
    assert config.teams["low"].priority == -(2**31) and config.teams["high.team-1_x"].priority == 2**31 - 1


def test_a_lone_surrogate_in_a_name_is_refused_naming_the_field():
    with pytest.raises(GatewayConfigError) as refused:
        parse_gateway_config({"teams": {"t\ud800": {}}}, Path("."))
    assert refused.value.field == "teams"
    with pytest.raises(GatewayConfigError) as refused:
        parse_team("t\ud800", {}, where="")  # an admin request's body
    assert refused.value.field == "name" and "name must be 1-64 characters" in str(refused.value)


def test_an_admin_body_names_bare_fields():
    with pytest.raises(GatewayConfigError) as refused:
        parse_team("x", {"priority": 2**80}, where="")
    assert refused.value.field == "priority" and str(refused.value).startswith("priority must be")
    with pytest.raises(GatewayConfigError) as refused:
        parse_team("x", {"budget": {"tokens": 0}}, where="")
    assert refused.value.field == "budget.tokens"
    with pytest.raises(GatewayConfigError) as refused:
        parse_team("x", {"prority": 1}, where="")
    assert refused.value.field == "prority" and "the body has unknown fields ['prority']" in str(
        refused.value
    )


@pytest.mark.parametrize(
    ("label", "named"),
    [
        ("x" * 257, "at most 256 characters, got 257 characters"),
        ("x\ud800", "unpaired"),
        (5, "got 5"),
        # `tokenmill keys list` prints labels: an escape code would clear the screen, set its title
        ("\x1b[2J\x1b[31mEVIL", "no control characters"),
        ("two\nlines", "no control characters"),
        ("nul\x00", "no control characters"),
    ],
)
def test_a_key_label_is_short_text(label, named):
    with pytest.raises(GatewayConfigError, match=named) as refused:
        parse_label(label)
    assert refused.value.field == "label"
    assert parse_label("x" * 256) == "x" * 256 and parse_label(None) is None


def test_a_ledger_that_cannot_be_a_file_is_named(tmp_path: Path):
    (tmp_path / "folder").mkdir()
    refused = _refused("ledger: folder", tmp_path)  # was sqlite3.OperationalError, a traceback
    assert refused.field == "ledger" and "ledger must be a file, not a folder" in str(refused)
    (tmp_path / "plain").write_text("")
    refused = _refused("ledger: plain/usage.db", tmp_path)  # was "[Errno 17] File exists"
    assert refused.field == "ledger" and f"{tmp_path / 'plain'} is a file, not a folder" in str(refused)
    refused = _refused("ledger: plain/deeper/usage.db", tmp_path)
    assert f"{tmp_path / 'plain'} is a file, not a folder" in str(refused)


def test_an_unreadable_config_is_named(tmp_path: Path):
    with pytest.raises(GatewayConfigError, match=r"cannot read the gateway config .*missing\.yaml"):
        load_gateway_config(tmp_path / "missing.yaml")


def test_names_are_read_as_written_not_as_yaml_numbers_or_booleans(tmp_path: Path):
    # YAML reads 007 as 7, 0x10 as 16, no as false, null as nothing: a team name changed unseen.
    (tmp_path / "g.yaml").write_text(
        "prices: {null: {prompt: 1}, 1.5: {prompt: 2}}\nteams: {007: {}, 0x10: {}, no: {}, 1_000: {}}\n"
    )
    config = load_gateway_config(tmp_path / "g.yaml")
    assert set(config.teams) == {"007", "0x10", "no", "1_000"}
    assert set(config.prices) == {"null", "1.5"}


def test_numbers_with_an_exponent_and_no_dot_are_numbers(tmp_path: Path):
    """YAML 1.1 reads 1e-7 as text: the natural way to write a price a token was refused as not a
    number, with an error that printed the limit as 1e+15, itself refused."""
    (tmp_path / "g.yaml").write_text(
        "prices: {demo: {prompt: 1e-7, completion: 4E-7}}\n"
        "teams: {a: {tokens_per_minute: 1e6, budget: {dollars: 1e3, period: day}}, 1e3: {}}\n"
    )
    config = load_gateway_config(tmp_path / "g.yaml")
    assert config.prices["demo"] == Price(1e-7, 4e-7)
    assert config.teams["a"].tokens_per_minute == 1_000_000
    assert config.teams["a"].budget == Budget("day", None, 1000.0)
    assert set(config.teams) == {"a", "1e3"}  # a name stays as written


@pytest.mark.parametrize(
    ("yaml", "named"),
    [
        ("teams: {a: {}}\nteams: {b: {}}\n", "the key 'teams' is given twice (first at line 1) at line 2"),
        ("teams:\n  a: {priority: 1}\n  a: {priority: 2}\n", "the key 'a' is given twice (first at line 2)"),
        ("teams: {a: {max_parallel: 1, max_parallel: 9}}\n", "the key 'max_parallel' is given twice"),
    ],
)
def test_a_key_given_twice_is_refused_rather_than_the_last_one_kept(tmp_path: Path, yaml: str, named: str):
    assert named in str(_refused(yaml, tmp_path))


def test_a_merge_key_may_be_overridden(tmp_path: Path):
    yaml = "teams:\n  a: &base {priority: 2, max_parallel: 4}\n  b:\n    <<: *base\n    priority: 1\n"
    (tmp_path / "g.yaml").write_text(yaml)
    b = load_gateway_config(tmp_path / "g.yaml").teams["b"]
    assert (b.priority, b.max_parallel) == (1, 4)


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path: Path):
    message = str(_refused("teams: {a: {\n", tmp_path))
    assert "\n" not in message and "not valid YAML" in message and "at line 2, column 1" in message


def test_a_ledger_under_home_is_expanded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "g.yaml").write_text("ledger: ~/usage.db\n")
    assert load_gateway_config(tmp_path / "g.yaml").ledger == tmp_path / "home" / "usage.db"


def test_a_whole_priority_written_as_a_float_is_taken_as_the_limits_are(tmp_path: Path):
    (tmp_path / "g.yaml").write_text("teams: {a: {priority: 10.0, requests_per_minute: 10.0}}\n")
    a = load_gateway_config(tmp_path / "g.yaml").teams["a"]
    assert (a.priority, a.requests_per_minute) == (10, 10) and isinstance(a.priority, int)
    assert "teams.b.priority must be an integer" in str(_refused("teams: {b: {priority: 1.5}}", tmp_path))
