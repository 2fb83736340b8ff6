"""The admission queue's fair shares when requests leave the queue without being served."""

from __future__ import annotations

import asyncio

import pytest

from tests.router.test_admission import Clock, fill
from tokenmill.router.admission import AdmissionQueue, QueueFull, QueuePolicy


@pytest.mark.parametrize("how", ["client_left", "timed_out"])
def test_a_team_is_not_charged_for_requests_that_left_the_queue_unserved(how: str):
    """Fair queuing charges a team's virtual time for what it asked; requests that leave the queue
    without a slot (their client left, or they waited past ``max_wait_s``) were never served, so
    they must not push the team's next requests behind the others' in a band that stays busy
    (before, five big requests given up in a congested band put the team's next one behind every
    other team's: the teams whose clients give up under congestion were starved for it)."""

    async def go() -> list[str]:
        clock = Clock()
        queue = AdmissionQueue(lambda: 1, QueuePolicy(overflow=0, max_wait_s=0.05), clock=clock)
        await queue.acquire("running", 0, 10)  # the only slot: the band stays busy throughout
        _, gone = await fill(queue, [("a", 0, 100_000)] * 5)
        if how == "client_left":
            for task in gone:
                task.cancel()
        results = await asyncio.gather(*gone, return_exceptions=True)
        expected = asyncio.CancelledError if how == "client_left" else QueueFull
        assert all(isinstance(r, expected) for r in results), results
        assert queue.waiting == 0
        order, tasks = await fill(queue, [("b", 0, 10), ("a", 0, 10), ("b", 0, 10), ("b", 0, 10)])
        for _ in range(4):
            queue.release(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(go())
    assert order.index("a") <= 1, order  # a's turn comes with b's first, not after all of b's
