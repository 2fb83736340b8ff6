"""The gateway's admission in process: what a request reserves, and the 400s that name the field to
change (``test_gateway.py`` sends requests through HTTP)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenmill.router.call import MAX_OUTPUT_TOKENS, Outcome, as_read_at, asked_output, estimate_tokens
from tokenmill.router.gateway import Admitted, Gateway, GatewayError
from tokenmill.router.gateway_config import Team, load_gateway_config
from tokenmill.router.prefix_index import prompt_text
from tokenmill.router.usage_meter import Usage

CONFIG = """
prices:
  demo: {prompt: 1.0, completion: 2.0}
teams:
  batch: {models: [demo], tokens_per_minute: 2000, budget: {tokens: 2000, period: day}}
  dollars: {models: [demo], budget: {dollars: 0.01, period: day}}
  daily: {models: [demo], budget: {tokens: 1000, period: day}}
  small: {models: [demo], tokens_per_minute: 500}
  open: {models: [demo], priority: 5}
  capped: {models: [demo], requests_per_minute: 2}
"""


@dataclass
class Front:
    """A gateway in process, and a key for each of its teams."""

    gateway: Gateway
    keys: dict[str, str]

    def admit(self, team: str, body: dict, headers: dict | None = None) -> Admitted:
        """As the router's app admits a request: its estimates first, then the gateway."""
        raw = json.dumps(body).encode()
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        request = as_read_at(path, json.loads(raw))
        prompt, _ = estimate_tokens(request, prompt_text(request))
        headers = {"authorization": f"Bearer {self.keys[team]}", **(headers or {})}
        return self.gateway.admit(request, raw, headers, prompt, asked_output(request))

    def refused(self, team: str, body: dict, headers: dict | None = None) -> GatewayError:
        with pytest.raises(GatewayError) as e:
            self.admit(team, body, headers)
        return e.value

    def finish(self, a: Admitted, prompt: int, completion: int) -> None:
        self.gateway.finish(a, Usage(prompt, completion, seen=True), "ok", 200, "w")


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    g = Gateway(load_gateway_config(config))
    yield Front(g, {team: g.create_key(team)[0] for team in g.teams})
    g.ledger.close()


PROMPTS = [f"Tell me about number {i}." for i in range(20)]


def test_a_batch_with_n_reserves_every_prompt_and_choice(front):
    """The QA repro: 20 prompts × n 6 × max_tokens 100 is 12,000 tokens to generate, six times
    the team's minute and its day: a 400 saying what max_tokens fits, not a 200."""
    body = {"model": "demo", "prompt": PROMPTS, "max_tokens": 100, "n": 6, "ignore_eos": True}
    e = front.refused("batch", body)
    assert (e.status, e.param) == (400, "max_tokens") and "120 sequences" in e.message
    fits = int(e.message.split("lower max_tokens to ")[1].split()[0])
    a = front.admit("batch", {**body, "max_tokens": fits})
    assert a.reservation.tokens == a.prompt_tokens + 120 * fits <= 2000
    front.finish(a, a.prompt_tokens, 120 * fits)
    over = front.refused("batch", {**body, "max_tokens": 1})  # the minute is spent
    assert (over.status, over.param) == (429, "tokens_per_minute")
    (total,) = front.gateway.ledger.usage("batch", None, None, "model")
    assert total["total_tokens"] <= 2000


def test_a_dollar_budget_is_checked_against_every_sequence(front):
    # A sequence's 100 tokens cost $0.0002: one fits $0.01, 20 prompts × n 6 ($0.024) never do:
    # a 400 saying what fits, not a 429 to retry tomorrow in vain.
    one = front.admit("dollars", {"model": "demo", "prompt": PROMPTS[0], "max_tokens": 100})
    front.gateway.finish(one, Usage(), "error", 500, "w")
    e = front.refused("dollars", {"model": "demo", "prompt": PROMPTS, "max_tokens": 100, "n": 6})
    assert (e.status, e.param, e.retry_after) == (400, "max_tokens", None)
    assert "day budget of $0.01" in e.message and "120 sequences" in e.message
    fits = int(e.message.split("lower max_tokens to ")[1].split()[0])
    a = front.admit("dollars", {"model": "demo", "prompt": PROMPTS, "max_tokens": fits, "n": 6})
    front.finish(a, a.prompt_tokens, 120 * fits)  # it used all it could: about $0.01
    spent = front.refused("dollars", {"model": "demo", "prompt": "Hi", "max_tokens": 100})
    assert (spent.status, spent.param) == (429, "budget") and spent.retry_after > 0  # fits a fresh day


def test_a_silly_max_tokens_is_refused_or_reserved_at_most_what_a_worker_can_be_asked(front):
    e = front.refused("small", {"model": "demo", "prompt": "Hi", "max_tokens": 10**23})
    assert (e.status, e.param) == (400, "max_tokens")
    # A team without limits: forwarded for the worker to refuse, its reservation capped
    a = front.admit("open", {"model": "demo", "prompt": "Hi", "max_tokens": 10**23})
    assert a.reservation.tokens == a.prompt_tokens + MAX_OUTPUT_TOKENS


def test_a_team_with_a_small_minute_can_send_a_request_naming_no_max_tokens(front):
    a = front.admit("small", {"model": "demo", "messages": [{"role": "user", "content": "Hi"}]})
    assert a.reservation.tokens == 500  # the prompt and what the minute leaves, not default_max_tokens
    front.finish(a, a.prompt_tokens, 600)  # it ran long: the bucket owes it
    later = front.refused("small", {"model": "demo", "prompt": "Hi"})
    assert (later.status, later.param) == (429, "tokens_per_minute")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x" * 4000}]}, "messages"),  # the prompt alone is over
        ({"prompt": "x" * 4000, "max_tokens": 4}, "prompt"),
        ({"prompt": "Hi", "max_tokens": 600}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 600},
            "max_completion_tokens",
        ),
        ({"prompt": "x" * 1600, "n": 128, "max_tokens": 4}, "n"),  # 100 left for 128 sequences
    ],
)
def test_a_request_over_a_whole_minute_names_the_field_to_change(front, body, param):
    e = front.refused("small", {"model": "demo", **body})
    assert (e.status, e.kind, e.param) == (400, "invalid_request_error", param)
    assert "tokens_per_minute limit of 500" in e.message and e.retry_after is None


@pytest.mark.parametrize(
    ("model", "says"),
    [(None, "model is required"), ("", "model is required"), (5, "must be a string"), (["demo"], "string")],
)
def test_model_must_be_a_string(front, model, says):
    e = front.refused("open", {"model": model, "prompt": "Hi"})
    assert (e.status, e.param) == (400, "model") and says in e.message


@pytest.mark.parametrize("header", ["1_0", "1 0", "\u0661\u0660", "+", "1e3", "0x10", "9" * 5000, str(2**31)])
def test_the_priority_header_is_a_sign_and_digits_only(front, header):
    e = front.refused("open", {"model": "demo", "prompt": "Hi"}, {"x-tokenmill-priority": header})
    assert (e.status, e.param) == (400, "priority")


@pytest.mark.parametrize(
    ("header", "priority"), [("3", 3), ("+3", 3), ("-4", -4), ("007", 5), (" 2 ", 2), ("", 5)]
)
def test_a_priority_header_lowers_the_teams(front, header, priority):
    a = front.admit("open", {"model": "demo", "prompt": "Hi"}, {"x-tokenmill-priority": header})
    assert a.priority == priority


def test_setting_a_team_again_does_not_refill_its_limits(front):
    for _ in range(2):
        front.finish(front.admit("capped", {"model": "demo", "prompt": "Hi"}), 1, 1)
    front.gateway.set_team(Team("capped", models=("demo",), requests_per_minute=2))  # re-POSTed, unchanged
    e = front.refused("capped", {"model": "demo", "prompt": "Hi"})
    assert (e.status, e.param) == (429, "requests_per_minute")


def test_a_request_naming_no_max_tokens_is_forwarded_with_what_it_reserved_a_sequence(front):
    """The QA repro: reserved 332 tokens a sequence, forwarded without max_tokens, one request of
    n 3 generated 3,030 tokens against a 1,000-token minute. The worker now gets the reservation."""
    chat = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "n": 3}
    a = front.admit("small", chat)
    each = (500 - a.prompt_tokens) // 3
    assert json.loads(a.body)["max_tokens"] == each and a.reservation.tokens == a.prompt_tokens + 3 * each
    batch = front.admit("open", {"model": "demo", "prompt": ["a", "b"], "n": 2})  # no minute: the default
    assert json.loads(batch.body)["max_tokens"] == 1024
    assert batch.reservation.tokens == batch.prompt_tokens + 4 * 1024
    named = front.admit("open", {"model": "demo", "messages": [], "max_completion_tokens": 9})
    assert "max_tokens" not in json.loads(named.body)  # it named its own: sent as it came


@pytest.mark.parametrize(
    ("team", "body", "param", "says"),
    [
        # The QA repro: 5,002 tokens against a 1,000-token day was a 429 with Retry-After ~a day.
        ("daily", {"prompt": "hello", "max_tokens": 5000}, "max_tokens", "day budget of 1000 tokens"),
        ("daily", {"messages": [{"role": "user", "content": "x" * 4000}]}, "messages", "shorten"),
        ("daily", {"prompt": "hello", "max_tokens": 400, "n": 3}, "max_tokens", "3 sequences"),
        ("dollars", {"prompt": "Hi", "max_tokens": 10_000}, "max_tokens", "day budget of $0.01"),
        ("dollars", {"prompt": "x" * 40_004, "max_tokens": 1}, "prompt", "shorten the prompt"),
    ],
)
def test_a_request_over_a_whole_budget_is_a_400_naming_the_field_to_change(front, team, body, param, says):
    e = front.refused(team, {"model": "demo", **body})
    assert (e.status, e.kind, e.param, e.retry_after) == (400, "invalid_request_error", param, None)
    assert says in e.message


def test_a_request_naming_no_max_tokens_fits_a_small_budget(front):
    a = front.admit("daily", {"model": "demo", "prompt": "hello"})  # default_max_tokens 1024 > 1000
    assert a.reservation.tokens == 1000 and json.loads(a.body)["max_tokens"] == 1000 - a.prompt_tokens
    d = front.admit("dollars", {"model": "demo", "prompt": "Hi"})  # $0.01: 4,999 completion tokens
    assert json.loads(d.body)["max_tokens"] == 1024


def test_concurrent_non_ascii_prompts_cannot_overshoot_a_budget(front):
    """The QA repro: five requests of 300 "€" at once (75 tokens each by the old estimate, 901 on
    the demo tokenizer) all passed a 1,000-token budget and used 4,555 tokens."""
    body = {"model": "demo", "prompt": "€" * 300, "max_tokens": 10}
    first = front.admit("daily", body)
    assert first.prompt_tokens >= 901
    e = front.refused("daily", body)
    assert (e.status, e.param) == (429, "budget")


def test_a_checkpoint_writes_the_worker_of_a_row_written_before_it_was_chosen(front):
    """A request that waited in the admission queue has its row on disk before its worker is
    chosen: the next checkpoint names the worker, so a dead gateway's row still does."""
    a = front.admit("open", {"model": "demo", "prompt": "Hi", "max_tokens": 4})  # (no loop: written now)
    outcome = Outcome(a)
    front.gateway.follow(a, outcome.completion_so_far)
    assert front.gateway.checkpoint() == 0  # no worker yet, nothing sent: nothing to write
    outcome.worker = "w1"  # the router chose it (forward.py)
    assert front.gateway.checkpoint() == 1 and front.gateway.checkpoint() == 0
    (row,) = front.gateway.ledger.rows("open")
    assert (row["status"], row["worker"]) == ("in_flight", "w1")


def test_a_request_whose_worker_failed_without_answering_is_charged_its_prompt(front):
    """The QA repro: a worker killed during a non-streamed request (503 "every worker failed this
    request", row unavailable) was charged nothing, though it had read the prompt."""
    body = {"model": "demo", "prompt": "Tell me a story", "max_tokens": 4}
    failed = front.admit("dollars", body)
    front.gateway.finish(failed, Usage(), "unavailable", 503, "w1")
    nowhere = front.admit("dollars", body)
    front.gateway.finish(nowhere, Usage(), "unavailable", 503, None)  # no worker had it: free
    rows = front.gateway.ledger.rows("dollars")
    assert [(r["worker"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        ("w1", failed.prompt_tokens, 0),
        (None, 0, 0),
    ]
    assert rows[0]["cost"] == pytest.approx(failed.prompt_tokens * 1.0 / 1e6)  # demo's prompt price


def test_a_restarted_gateway_starts_the_minute_limits_from_the_ledgers_last_minute(front, tmp_path):
    """The buckets lived in memory: a restart handed every team a fresh minute on top of the one
    it had just used."""
    for _ in range(2):  # capped: 2 requests a minute
        front.finish(front.admit("capped", {"model": "demo", "prompt": "Hi", "max_tokens": 5}), 3, 5)
    a = front.admit(
        "small", {"model": "demo", "prompt": "Hi", "max_tokens": 400}
    )  # small: 500 tokens a minute
    front.finish(a, 3, 400)
    front.gateway.ledger.close()
    restarted = Front(Gateway(load_gateway_config(tmp_path / "gateway.yaml")), front.keys)
    assert restarted.refused("capped", {"model": "demo", "prompt": "Hi", "max_tokens": 5}).param == (
        "requests_per_minute"
    )
    assert restarted.refused("small", {"model": "demo", "prompt": "Hi", "max_tokens": 200}).param == (
        "tokens_per_minute"
    )
    assert restarted.admit("small", {"model": "demo", "prompt": "Hi", "max_tokens": 50})  # what is left
    assert restarted.admit("open", {"model": "demo", "prompt": "Hi"})  # no minute limit: untouched
    restarted.gateway.ledger.close()


def test_a_whole_answer_without_usage_is_charged_what_it_reserved(front):
    """A worker that reports no usage: a stream is charged its content chunks, a whole answer
    (no chunks to count) what it reserved. It was charged the prompt alone, so n=4 with 100
    tokens each passed for free."""
    a = front.admit("open", {"model": "demo", "prompt": "Hi", "max_tokens": 100, "n": 4})
    front.gateway.finish(a, Usage(), "ok", 200, "w", None)
    (row,) = [r for r in front.gateway.ledger.rows("open") if r["request_id"] == a.request_id]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (a.prompt_tokens, 400)
    s = front.admit("open", {"model": "demo", "prompt": "Hi", "max_tokens": 100, "stream": True})
    front.gateway.finish(s, Usage(), "ok", 200, "w", 7)
    (row,) = [r for r in front.gateway.ledger.rows("open") if r["request_id"] == s.request_id]
    assert row["completion_tokens"] == 7


def test_a_request_whose_usage_could_not_be_recorded_is_still_charged_its_prompt(front):
    """The ledger failed after the worker's head (a 503 to the client): the worker read the prompt
    (and, for a whole answer, generated it all). It was charged nothing, so retries through a
    failing ledger got compute nobody counted."""
    a = front.admit("small", {"model": "demo", "prompt": "Hi", "max_tokens": 100})
    front.gateway.finish(a, Usage(), "ledger_error", 503, "w", None)
    (row,) = [r for r in front.gateway.ledger.rows("small") if r["request_id"] == a.request_id]
    assert row["prompt_tokens"] == a.prompt_tokens > 0
