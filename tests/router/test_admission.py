"""The gateway's admission queue: priority bands, weighted fair shares, aging, bounds."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.router.admission import AdmissionQueue, QueueFull, QueuePolicy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def fill(
    queue: AdmissionQueue, requests: list[tuple[str, int, int]]
) -> tuple[list[str], list[asyncio.Task]]:
    """Queue ``(team, priority, tokens)`` requests behind a full queue; returns the admission order
    as slots free one at a time (each admitted request is released at once)."""
    order: list[str] = []

    async def one(team: str, priority: int, tokens: int) -> None:
        await queue.acquire(team, priority, tokens)
        order.append(team)

    tasks = [asyncio.create_task(one(*r)) for r in requests]
    await asyncio.sleep(0)
    return order, tasks


def drain(queue: AdmissionQueue, n: int) -> None:
    for _ in range(n):
        queue.release(0)


def test_higher_bands_go_first_and_a_free_slot_admits_at_once():
    async def go() -> list[str]:
        queue = AdmissionQueue(lambda: 1, QueuePolicy(overflow=0))
        await queue.acquire("x", 0, 10)  # takes the only slot
        order, tasks = await fill(queue, [("low", 0, 10), ("high", 10, 10), ("mid", 5, 10)])
        for _ in range(3):
            queue.release(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == ["high", "mid", "low"]


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    flood=st.integers(20, 60),
    tokens=st.integers(1, 500),
)
def test_backlogged_teams_share_slots_by_weight_however_one_floods(weights, flood, tokens):
    teams = [f"t{i}" for i in range(len(weights))]
    weight = dict(zip(teams, weights, strict=True))

    async def go() -> list[str]:
        queue = AdmissionQueue(lambda: 1, weight=lambda t: weight[t])
        await queue.acquire("x", 0, 1)
        # the first team floods first; the others queue a fair amount each
        requests = [(teams[0], 0, tokens)] * flood
        for t in teams[1:]:
            requests += [(t, 0, tokens)] * (flood // 2)
        order, tasks = await fill(queue, requests)
        for _ in range(len(requests)):
            queue.release(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(go())
    served = dict.fromkeys(teams, 0)
    backlog = {t: flood if t == teams[0] else flood // 2 for t in teams}
    for team in order:
        if any(served[t] == backlog[t] for t in teams):
            break  # past here some team has nothing queued: shares no longer apply
        served[team] += 1
        normalized = [served[t] / weight[t] for t in teams]
        bound = 1 / min(weights) + 1 / min(weights)  # one request of each, in virtual time
        assert max(normalized) - min(normalized) <= bound


def test_aging_moves_a_low_band_that_waited_past_a_busy_high_band():
    async def go() -> list[str]:
        clock = Clock()
        queue = AdmissionQueue(lambda: 1, QueuePolicy(aging_s=1.0, overflow=0), clock=clock)
        await queue.acquire("x", 0, 1)
        order, tasks = await fill(queue, [("low", 0, 1)])
        clock.t = 3.5  # the low request waited 3.5 aging periods
        more, high = await fill(queue, [("high", 3, 1), ("high", 3, 1)])
        for _ in range(3):
            queue.release(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks, *high)
        return order + more

    admitted = asyncio.run(go())
    assert admitted[0] == "low"  # 0 + 3.5 beats 3 + 0


def test_a_full_band_and_a_long_wait_are_refused_and_cost_no_slot():
    async def go() -> None:
        queue = AdmissionQueue(lambda: 1, QueuePolicy(max_waiting=1, max_wait_s=0.05))
        await queue.acquire("x", 0, 1)
        waiter = asyncio.create_task(queue.acquire("a", 0, 1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="queue is full") as full:
            await queue.acquire("b", 0, 1)
        assert full.value.retry_after >= 1
        with pytest.raises(QueueFull, match="waited"):
            await waiter
        assert (queue.waiting, queue.in_flight, queue.refused) == (0, 1, 2)
        queue.release(0)
        assert queue.in_flight == 0

    asyncio.run(go())


def test_a_client_that_leaves_while_waiting_frees_its_place():
    async def go() -> None:
        queue = AdmissionQueue(lambda: 1)
        await queue.acquire("x", 0, 1)
        waiter = asyncio.create_task(queue.acquire("a", 0, 1))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert queue.waiting == 0
        queue.release(0)
        assert queue.in_flight == 0
        await queue.acquire("b", 0, 1)  # straight through
        assert queue.in_flight == 1

    asyncio.run(go())


def test_without_fair_queuing_a_band_is_first_come_first_served():
    async def go() -> list[str]:
        queue = AdmissionQueue(lambda: 1, QueuePolicy(fair=False))
        await queue.acquire("x", 0, 1)
        order, tasks = await fill(queue, [("flood", 0, 10)] * 4 + [("quiet", 0, 10)])
        for _ in range(5):
            queue.release(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == ["flood"] * 4 + ["quiet"]


def test_a_request_that_outranks_what_runs_takes_an_overflow_slot_at_once():
    async def go() -> None:
        queue = AdmissionQueue(lambda: 8, QueuePolicy(overflow=0.25))  # 2 overflow slots
        for _ in range(8):
            await queue.acquire("standard", 0, 10)
        waiter = asyncio.create_task(queue.acquire("standard", 0, 10))
        await asyncio.sleep(0)
        assert queue.waiting == 1
        assert not queue.outranks_running(0)
        await asyncio.wait_for(queue.acquire("premium", 10, 10), 0.1)  # no wait: the worker preempts
        assert queue.outranks_running(10)  # so it is routed where the least prefill is under way
        await asyncio.wait_for(queue.acquire("premium", 10, 10), 0.1)
        assert queue.in_flight == 10
        late = asyncio.create_task(queue.acquire("premium", 10, 10))  # overflow used up: it waits
        await asyncio.sleep(0)
        assert not late.done() and queue.waiting == 2
        for _ in range(3):
            queue.release(0)
        await asyncio.wait_for(late, 1)  # premium first...
        await asyncio.sleep(0.01)
        assert not waiter.done() and queue.in_flight == 8
        for _ in range(3):
            queue.release(10)
        await asyncio.wait_for(waiter, 1)  # ...then standard

    asyncio.run(go())


def test_standard_requests_never_overflow():
    async def go() -> None:
        queue = AdmissionQueue(lambda: 2, QueuePolicy(overflow=1.0))
        await queue.acquire("a", 0, 1)
        await queue.acquire("a", 0, 1)
        waiter = asyncio.create_task(queue.acquire("b", 0, 1))  # nothing below it runs: it waits
        await asyncio.sleep(0)
        assert not waiter.done() and queue.in_flight == 2
        queue.release(0)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(go())
