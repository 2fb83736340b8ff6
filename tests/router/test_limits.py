"""Per-team limits: reservations at admission, refunds at the end, budgets over calendar periods."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router.gateway_config import Budget, Price, Team
from tokenmill.router.limits import Limiter, Refusal, Reservation, tokens_to_reserve


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(team: Team, spent=(0, 0.0), wall: float | None = None) -> tuple[Limiter, Clock, Clock]:
    clock, wall_clock = Clock(), Clock(wall or datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp())
    lim = Limiter(lambda t: spent, clock=clock, wall=wall_clock)
    lim.configure(team)
    return lim, clock, wall_clock


def test_tokens_per_minute_reserves_prompt_plus_max_tokens_and_refunds_the_rest():
    lim, clock, _ = limiter(Team("a", tokens_per_minute=1000))
    first = lim.admit("a", 600, 0.0)
    assert isinstance(first, Reservation)
    refused = lim.admit("a", 600, 0.0)  # 400 left: a second reservation of 600 does not fit
    assert isinstance(refused, Refusal) and refused.limit == "tokens_per_minute" and refused.status == 429
    assert refused.retry_after == 12  # 200 tokens short at 1000/min
    lim.release(first, 150, 0.0)  # used 150 of 600: 450 back
    assert isinstance(lim.admit("a", 600, 0.0), Reservation)  # 850 left
    clock.t += 60  # a minute refills the bucket, never past its capacity
    assert isinstance(lim.admit("a", 1000, 0.0), Reservation)


def test_a_request_bigger_than_the_minute_allowance_is_a_400_naming_the_field_and_what_fits():
    team = Team("a", tokens_per_minute=1000)
    refused = tokens_to_reserve({"max_tokens": 1200}, team, 300, 1200, 1024)
    assert isinstance(refused, Refusal) and refused.status == 400
    assert (refused.limit, refused.param) == ("tokens_per_minute", "max_tokens")
    assert "lower max_tokens to 700 or less" in refused.message
    chat = {"messages": [], "max_completion_tokens": 1200}
    assert tokens_to_reserve(chat, team, 300, 1200, 1024).param == "max_completion_tokens"
    too_long = tokens_to_reserve({"messages": [], "max_tokens": 100}, team, 1200, 100, 1024)
    assert isinstance(too_long, Refusal) and too_long.param == "messages"  # the prompt alone is over
    assert "shorten the messages" in too_long.message
    assert tokens_to_reserve({"prompt": "x" * 4800}, team, 1200, None, 1024).param == "prompt"
    assert tokens_to_reserve({"max_tokens": 700}, team, 300, 700, 1024) == 1000  # exactly a minute fits


def test_every_prompt_and_every_choice_is_reserved():
    """20 prompts × n 6 × max_tokens 100 against 2,000 tokens a minute: 12,000 to generate, more
    than a minute holds. What fits: (2,000 - 200 prompt tokens) // 120 sequences = 15 each."""
    team = Team("a", tokens_per_minute=2000)
    batch = {"prompt": ["p"] * 20, "max_tokens": 100, "n": 6}
    refused = tokens_to_reserve(batch, team, 200, 12_000, 1024)
    assert isinstance(refused, Refusal) and refused.param == "max_tokens"
    assert "lower max_tokens to 15 or less" in refused.message and "120 sequences" in refused.message
    assert tokens_to_reserve({**batch, "max_tokens": 15}, team, 200, 1800, 1024) == 2000
    crowded = tokens_to_reserve({"prompt": "p", "n": 128}, Team("a", tokens_per_minute=100), 10, None, 1024)
    assert isinstance(crowded, Refusal) and crowded.param == "n"  # 90 left: not one token a sequence
    assert "(prompts × n)" in crowded.message


def test_when_best_of_sets_the_sequences_the_refusal_names_it_not_n():
    """The QA leftover: best_of 8 with n 2 is eight sequences a prompt, and the 400 said "prompts × n"."""
    team = Team("a", tokens_per_minute=1000)
    batch = {"prompt": ["p"] * 2, "max_tokens": 100, "n": 2, "best_of": 8}
    refused = tokens_to_reserve(batch, team, 20, 1600, 1024)
    assert isinstance(refused, Refusal) and "16 sequences, prompts × best_of" in refused.message
    crowded = tokens_to_reserve({"prompt": "p", "n": 1, "best_of": 128}, team, 990, None, 1024)
    assert isinstance(crowded, Refusal) and crowded.param == "best_of"
    assert "(prompts × best_of)" in crowded.message


def test_a_request_naming_no_max_tokens_reserves_what_the_minute_leaves_up_to_the_default():
    small = Team("a", tokens_per_minute=500)
    assert tokens_to_reserve({}, small, 14, None, 1024) == 500  # 14 + 486, not a 400
    assert tokens_to_reserve({"n": 2}, small, 14, None, 1024) == 14 + 2 * 243
    assert tokens_to_reserve({}, Team("a", tokens_per_minute=5000), 14, None, 1024) == 14 + 1024
    assert tokens_to_reserve({"n": 3}, Team("a"), 14, None, 1024) == 14 + 3 * 1024  # no minute to fit
    lim, _, _ = limiter(small)
    r = lim.admit("a", 500, 0.0)
    assert isinstance(r, Reservation)
    lim.release(r, 14 + 600, 0.0)  # it generated past its reservation: the bucket owes the difference
    assert lim._teams["a"].tokens.level == -114


def test_requests_per_minute_and_parallel_slots():
    lim, _, _ = limiter(Team("a", requests_per_minute=2, max_parallel=1))
    r = lim.admit("a", 10, 0.0)
    assert isinstance(r, Reservation)
    blocked = lim.admit("a", 10, 0.0)
    assert isinstance(blocked, Refusal) and blocked.limit == "max_parallel" and blocked.retry_after == 1
    lim.release(r, 10, 0.0)
    lim.release(r, 10, 0.0)  # twice is once
    assert lim.in_flight("a") == 0
    second = lim.admit("a", 10, 0.0)
    assert isinstance(second, Reservation)
    lim.release(second, 10, 0.0)
    over = lim.admit("a", 10, 0.0)
    assert isinstance(over, Refusal) and over.limit == "requests_per_minute" and over.retry_after == 30


def test_reconfiguring_a_team_keeps_what_its_buckets_hold():
    lim, clock, _ = limiter(Team("a", requests_per_minute=2, tokens_per_minute=1000))
    for _ in range(2):
        r = lim.admit("a", 400, 0.0)
        assert isinstance(r, Reservation)
        lim.release(r, 400, 0.0)
    lim.configure(Team("a", requests_per_minute=2, tokens_per_minute=1000))  # the same team, re-POSTed
    again = lim.admit("a", 10, 0.0)
    assert isinstance(again, Refusal) and again.limit == "requests_per_minute"
    lim.configure(Team("a", requests_per_minute=60, tokens_per_minute=100))  # more requests, fewer tokens
    state = lim._teams["a"]
    assert state.requests.level == 0 and state.tokens.level == 100  # 200 left, clamped to 100
    assert isinstance(lim.admit("a", 10, 0.0), Refusal)  # a larger capacity is not granted at once
    clock.t += 1  # ... but refills at its new rate: one request a second
    assert isinstance(lim.admit("a", 10, 0.0), Reservation)
    lim.configure(Team("a"))  # limits removed, then added again: a new limit starts full
    lim.configure(Team("a", requests_per_minute=2))
    assert lim._teams["a"].requests.level == 2 and lim.in_flight("a") == 1


def test_a_token_budget_counts_spent_and_in_flight_and_resets_with_its_period():
    lim, _, wall = limiter(Team("a", budget=Budget("day", tokens=1000)), spent=(700, 0.0))
    refused = lim.admit("a", 400, 0.0)
    assert isinstance(refused, Refusal) and refused.limit == "budget"
    assert refused.retry_after == 12 * 3600  # noon: midnight UTC is 12 h away
    r = lim.admit("a", 300, 0.0)
    assert isinstance(r, Reservation)
    assert isinstance(lim.admit("a", 1, 0.0), Refusal)  # 700 spent + 300 in flight
    lim.release(r, 100, 0.0)  # 800 spent
    assert isinstance(lim.admit("a", 200, 0.0), Reservation)
    wall.t += 13 * 3600  # the next day: the ledger's spend for it (stubbed: 700) is read again
    assert isinstance(lim.admit("a", 100, 0.0), Reservation)


def test_a_dollar_budget():
    lim, _, _ = limiter(Team("a", budget=Budget("month", dollars=1.0)), spent=(0, 0.9))
    assert isinstance(lim.admit("a", 10, 0.05), Reservation)
    refused = lim.admit("a", 10, 0.08)
    assert isinstance(refused, Refusal) and "$1" in refused.message


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("admit"), st.integers(1, 400)),
            st.tuples(st.just("release"), st.integers(0, 500)),
            st.tuples(st.just("wait"), st.floats(0, 30)),
        ),
        max_size=80,
    )
)
def test_in_flight_is_always_counted_and_the_bucket_never_overfills(ops):
    lim, clock, _ = limiter(Team("a", tokens_per_minute=1000, max_parallel=5))
    held: list[Reservation] = []
    for op, value in ops:
        if op == "admit":
            r = lim.admit("a", value, 0.0)
            if isinstance(r, Reservation):
                held.append(r)
        elif op == "release" and held:
            r = held.pop(0)
            lim.release(r, min(value, r.tokens), 0.0)
        elif op == "wait":
            clock.t += value
        state = lim._teams["a"]
        assert state.parallel == len(held) <= 5
        assert state.held_tokens == sum(r.tokens for r in held)
        assert state.tokens is not None and state.tokens.level <= state.tokens.capacity


def test_a_request_over_a_whole_budget_period_is_a_400_not_a_429_for_tomorrow():
    """The QA repro: 5,002 tokens against a 1,000-token day got a 429 with Retry-After ~23 h."""
    team = Team("a", budget=Budget("day", tokens=1000))
    refused = tokens_to_reserve({"max_tokens": 5000}, team, 2, 5000, 1024)
    assert isinstance(refused, Refusal) and (refused.status, refused.limit, refused.param) == (
        400,
        "budget",
        "max_tokens",
    )
    assert "day budget of 1000 tokens" in refused.message and "lower max_tokens to 998" in refused.message
    assert tokens_to_reserve({"max_tokens": 998}, team, 2, 998, 1024) == 1000
    tight = Team("a", tokens_per_minute=500, budget=Budget("day", tokens=1000))  # the lower one says
    assert tokens_to_reserve({"max_tokens": 600}, tight, 2, 600, 1024).limit == "tokens_per_minute"
    assert tokens_to_reserve({}, Team("a", budget=Budget("week", tokens=300)), 20, None, 1024) == 300


@given(
    dollars=st.floats(1e-6, 100),
    prompt_price=st.floats(0, 50),
    completion_price=st.floats(1e-3, 50),
    prompt=st.integers(1, 100_000),
)
def test_what_a_dollar_budget_fits_is_exactly_what_the_limiter_lets_through(
    dollars, prompt_price, completion_price, prompt
):
    price = Price(prompt_price, completion_price)
    team = Team("a", budget=Budget("day", dollars=dollars))
    refused = tokens_to_reserve({"max_tokens": 10**12}, team, prompt, 10**12, 1024, price)
    assert isinstance(refused, Refusal) and refused.status == 400
    if refused.param == "prompt":  # with the prompt, not one output token is paid for
        assert price.cost(prompt, 1) > dollars
        return
    fits = int(refused.message.split("lower max_tokens to ")[1].split()[0])
    tokens = tokens_to_reserve({"max_tokens": fits}, team, prompt, fits, 1024, price)
    assert tokens == prompt + fits
    lim, _, _ = limiter(team)
    assert isinstance(lim.admit("a", tokens, price.cost(prompt, fits)), Reservation)
    more = tokens_to_reserve({"max_tokens": fits + 1}, team, prompt, fits + 1, 1024, price)
    assert isinstance(more, Refusal) and more.status == 400
