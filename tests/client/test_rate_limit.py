"""Client quotas (GCRA): no-burst pacing, a minute's burst, refunds; and the concurrency gate."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.client.conftest import FakeClock
from tokenmill.client.gate import ConcurrencyGate
from tokenmill.client.rate_limit import Quota, QuotaExceeded, RateLimiter


def test_no_burst_spaces_requests_evenly():
    clock = FakeClock(1000.0)
    limiter = RateLimiter(Quota(requests_per_minute=120, no_burst=True), clock=clock)
    assert limiter.delay(0) == 0
    limiter._requests.take(1)  # type: ignore[union-attr]
    assert limiter.delay(0) == pytest.approx(0.5)  # 120/min: one every half second
    clock.now += 0.5
    assert limiter.delay(0) == 0


def test_without_no_burst_a_minutes_quota_may_go_at_once_then_the_pace_holds():
    clock = FakeClock(1000.0)
    limiter = RateLimiter(Quota(requests_per_minute=60), clock=clock)
    for _ in range(60):
        assert limiter.delay(0) == 0
        limiter._requests.take(1)  # type: ignore[union-attr]
    assert limiter.delay(0) == pytest.approx(1.0)


def test_tokens_refunded_when_a_reply_is_shorter_than_its_reservation():
    clock = FakeClock(1000.0)
    limiter = RateLimiter(Quota(tokens_per_minute=600, no_burst=True), clock=clock)  # 10 tokens/s
    limiter._tokens.take(100)  # type: ignore[union-attr]
    assert limiter.delay(10) == pytest.approx(10.0)
    limiter.settle(reserved=100, used=40)
    assert limiter.delay(10) == pytest.approx(4.0)
    limiter.settle(reserved=10, used=30)  # used more than reserved: charged
    assert limiter.delay(10) == pytest.approx(6.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2.0), st.integers(1, 50)), min_size=1, max_size=60))
def test_tokens_admitted_never_exceed_the_pace_plus_one_request(arrivals):
    """With no burst, tokens admitted by time t are at most rate * t plus the largest request."""
    clock = FakeClock(1000.0)
    start = clock.now
    limiter = RateLimiter(Quota(tokens_per_minute=600, no_burst=True), clock=clock)
    admitted = 0
    for gap, tokens in arrivals:
        clock.now += gap
        clock.now += limiter.delay(tokens)  # wait as acquire would
        limiter._tokens.take(tokens)  # type: ignore[union-attr]
        admitted += tokens
        assert admitted <= 10 * (clock.now - start) + 50 + 1e-6


@pytest.mark.parametrize("no_burst", [False, True])
def test_a_request_larger_than_a_minutes_quota_fails_at_once_and_holds_nobody_up(no_burst):
    """Before: max_tokens 10**12 was computed to wait years (or, with no_burst, went and made every
    later request wait years), holding the FIFO lock for everyone behind it."""

    async def run() -> None:
        limiter = RateLimiter(Quota(tokens_per_minute=1000, no_burst=no_burst))
        with pytest.raises(QuotaExceeded, match=r"max_tokens.*tokens_per_minute=1000"):
            await asyncio.wait_for(limiter.acquire(10**12), 1)
        await asyncio.wait_for(limiter.acquire(1000), 1)  # a whole minute's worth still goes

    asyncio.run(run())


def test_quota_rejects_non_positive_values_by_name():
    with pytest.raises(ValueError, match="tokens_per_minute"):
        Quota(tokens_per_minute=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["acquire", "release", "shrink", "grow"]), max_size=80))
def test_gate_never_lets_more_in_than_the_limit_allowed_when_they_entered(ops):
    async def run() -> None:
        limit = [3]
        gate = ConcurrencyGate(lambda: limit[0])
        holders: list[asyncio.Task[None]] = []
        for op in ops:
            if op == "acquire":
                holders.append(asyncio.create_task(gate.acquire()))
            elif op == "release":
                granted = [t for t in holders if t.done()]
                if granted:
                    holders.remove(granted[0])
                    gate.release()
            elif op == "shrink":
                limit[0] = max(1, limit[0] - 1)
            else:
                limit[0] += 1
                gate.wake()
            await asyncio.sleep(0)
            granted = sum(t.done() for t in holders)
            assert gate.in_flight == granted
            assert gate.waiting == len(holders) - granted
            if gate.waiting:  # nobody waits while a slot is free
                assert gate.in_flight >= limit[0]
        for t in holders:
            t.cancel()

    asyncio.run(run())


def test_gate_serves_waiters_first_come_first_served():
    async def run() -> list[int]:
        gate = ConcurrencyGate(lambda: 1)
        await gate.acquire()
        order: list[int] = []

        async def waiter(i: int) -> None:
            await gate.acquire()
            order.append(i)
            gate.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
        await asyncio.sleep(0)
        gate.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == [0, 1, 2, 3, 4]
