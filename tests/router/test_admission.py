"""The gateway's admission queue: priority bands, weighted fair shares, aging, bounds."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.router.admission import AdmissionQueue, NoCapacity, QueueFull, QueuePolicy


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


def test_max_waiting_bounds_every_band_together_and_a_higher_priority_takes_the_lowest_place():
    """The QA repro: 40 requests at priorities -100, -101, ... each made a band of its own, and
    all 40 waited against max_waiting 2. Now 2 wait; a higher priority pushes out the lowest."""

    async def go() -> None:
        queue = AdmissionQueue(lambda: 1, QueuePolicy(max_waiting=2, max_wait_s=5, overflow=0))
        await queue.acquire("x", 0, 1)
        tasks = [asyncio.create_task(queue.acquire("lo", -100 - i, 1)) for i in range(40)]
        await asyncio.sleep(0)
        assert queue.waiting == 2 and queue.refused == 38
        refused = [t for t in tasks if t.done()]
        assert all(isinstance(t.exception(), QueueFull) for t in refused)
        first, second = tasks[0], tasks[1]  # priorities -100 and -101 wait
        assert not first.done() and not second.done()
        with pytest.raises(QueueFull, match="queue is full") as full:
            await queue.acquire("lo", -101, 1)  # no higher than the lowest waiting: refused
        assert full.value.retry_after >= 1
        high = asyncio.create_task(queue.acquire("hi", 5, 1))
        await asyncio.wait({second}, timeout=1)
        assert second.done() and "took the place" in str(second.exception())  # the lowest, out
        assert second.exception().retry_after >= 1
        assert queue.waiting == 2 and not high.done() and not first.done()
        queue.release(0)
        await asyncio.wait_for(high, 1)
        queue.release(5)
        await asyncio.wait_for(first, 1)
        queue.release(-100)
        assert (queue.waiting, queue.in_flight, queue._bands, queue._running) == (0, 0, {}, {})

    asyncio.run(go())


def test_a_band_is_dropped_once_nothing_waits_or_runs_in_it():
    async def go() -> None:
        queue = AdmissionQueue(lambda: 1, QueuePolicy(max_wait_s=0.05, overflow=0))
        await queue.acquire("x", 0, 1)
        for priority in range(-20, 0):  # each waits in a band of its own, then times out
            with pytest.raises(QueueFull, match="waited"):
                await queue.acquire("a", priority, 1)
        assert queue._bands == {}
        waiter = asyncio.create_task(queue.acquire("a", -7, 1))
        await asyncio.sleep(0)
        assert list(queue._bands) == [-7]
        queue.release(0)
        await asyncio.wait_for(waiter, 1)
        assert list(queue._bands) == [-7]  # it runs there: the band's fair shares still apply
        queue.release(-7)
        assert queue._bands == {}

    asyncio.run(go())


async def settle() -> None:
    """Let every task woken so far run (a refusal or admission takes a few turns to reach it)."""
    for _ in range(8):
        await asyncio.sleep(0)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(-6, 6)),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, capacity=st.integers(1, 3), max_waiting=st.integers(1, 4))
def test_any_mix_of_priorities_never_waits_past_max_waiting_or_leaves_a_band_behind(
    ops, capacity, max_waiting
):
    async def go() -> None:
        queue = AdmissionQueue(lambda: capacity, QueuePolicy(max_waiting=max_waiting, overflow=0))
        pending: list[tuple[int, asyncio.Task]] = []  # (priority, acquire) in order
        running: list[int] = []  # priorities admitted, not released
        for op, value in ops:
            if op == "acquire":
                pending.append((value, asyncio.create_task(queue.acquire("t", value, 1))))
            elif op == "release" and running:
                queue.release(running.pop(value % len(running)))
            elif op == "cancel" and pending:
                pending[value % len(pending)][1].cancel()
            await settle()
            still = []
            for priority, task in pending:
                if not task.done():
                    still.append((priority, task))
                elif not task.cancelled() and task.exception() is None:
                    running.append(priority)
                elif not task.cancelled():
                    assert isinstance(task.exception(), QueueFull)
            pending = still
            assert queue.waiting == len(pending) <= max_waiting
            assert queue.in_flight == len(running)
            live = {p for p, _ in pending} | set(running)
            assert set(queue._bands) <= live  # no band without a request waiting or running
            if pending:  # whoever waits, waits for a reason: no slot is free
                assert queue.in_flight >= capacity
        for _, task in pending:
            task.cancel()
        await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
        for priority in running:
            queue.release(priority)
        assert (queue.waiting, queue.in_flight, queue._bands) == (0, 0, {})

    asyncio.run(go())


def test_a_pool_without_any_slot_refuses_at_once_and_its_last_worker_leaving_refuses_the_waiting():
    """No capacity at all is NoCapacity (the router's 503 with Retry-After: 1), at once, not a
    wait of max_wait_s ending in a queue's 429; dispatch() after the workers change seats the
    waiting when capacity grows and refuses them when it falls to none."""

    async def go() -> None:
        slots = [0]
        queue = AdmissionQueue(lambda: slots[0], QueuePolicy(max_wait_s=30, overflow=0))
        with pytest.raises(NoCapacity):
            await asyncio.wait_for(queue.acquire("a", 10, 1), 1)  # at once, whatever the priority
        assert (queue.in_flight, queue.waiting) == (0, 0)
        slots[0] = 1
        await queue.acquire("x", 0, 1)  # takes the only slot
        waiters = [asyncio.create_task(queue.acquire(team, 0, 1)) for team in ("a", "b", "c")]
        await asyncio.sleep(0)
        assert queue.waiting == 3
        slots[0] = 2  # a worker joined: one of them is seated without waiting for a release
        queue.dispatch()
        await asyncio.sleep(0)
        assert (queue.in_flight, queue.waiting) == (2, 2)
        slots[0] = 0  # every worker went away
        queue.dispatch()
        done = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 1)
        assert sorted(type(r).__name__ for r in done) == ["NoCapacity", "NoCapacity", "NoneType"]
        assert queue.waiting == 0
        queue.release(0)
        queue.release(0)
        assert queue.in_flight == 0

    asyncio.run(go())
