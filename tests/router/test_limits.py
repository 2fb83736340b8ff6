"""Per-team limits: reservations at admission, refunds at the end, budgets over calendar periods."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router.gateway_config import Budget, Team
from tokenmill.router.limits import Limiter, Refusal, Reservation


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


def test_a_request_bigger_than_the_minute_allowance_is_a_400_saying_what_would_fit():
    lim, _, _ = limiter(Team("a", tokens_per_minute=1000))
    refused = lim.admit("a", 1500, 0.0, prompt_tokens=300)
    assert isinstance(refused, Refusal) and refused.status == 400
    assert "lower max_tokens to 700 or less" in refused.message
    too_long = lim.admit("a", 1300, 0.0, prompt_tokens=1200)  # the prompt alone is over
    assert isinstance(too_long, Refusal) and "shorten the prompt" in too_long.message
    assert isinstance(lim.admit("a", 1000, 0.0, prompt_tokens=300), Reservation)  # nothing was taken


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
