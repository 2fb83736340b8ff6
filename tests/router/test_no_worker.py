"""Behind the gateway, no worker available is the guide's 503 with ``Retry-After: 1``, at once: for a
new request, and for the requests waiting in the admission queue when the last worker goes away
(not a 429 "waited 30 s in the queue", which blames the team's limits)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.router.test_gateway import ADMIN, admin, chat, create_key
from tests.router.test_route import RouterProcess, wait_until
from tests.server.conftest import start_server


def test_no_worker_left_is_a_503_at_once_for_new_and_waiting_requests(tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text("ledger: usage.db\nqueue: {max_wait_s: 30}\nteams:\n  t: {models: [demo]}\n")
    key = create_key(config, "t")
    single = start_server("--max-num-seqs", "1")  # reports one slot: a second request waits
    router = None
    try:
        router = RouterProcess(
            single.url, extra=("--gateway-config", str(config)), env={"TOKENMILL_ADMIN_KEY": ADMIN}
        )
        wait_until(lambda: router.status()["workers"][0]["slots"] == 1, "the worker's slot from its metrics")
        body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000,
                "ignore_eos": True, "stream": True}  # fmt: skip
        headers = {"authorization": f"Bearer {key}"}
        with httpx.stream(
            "POST", f"{router.url}/v1/chat/completions", json=body, headers=headers, timeout=60
        ) as held:
            lines = held.iter_lines()
            next(lines)  # in flight: it holds the only slot
            answers: list[tuple[httpx.Response, float]] = []

            def wait_in_queue() -> None:
                r = chat(router.url, key)
                answers.append((r, time.monotonic()))

            waiter = threading.Thread(target=wait_in_queue)
            waiter.start()
            wait_until(lambda: router.status()["queues"]["throughput"]["waiting"] == 1, "one waiting")
            drained = time.monotonic()
            drain = admin("POST", router.url, "/admin/workers", json={"url": single.url, "action": "drain"})
            assert drain.status_code == 200
            waiter.join(20)
            ((queued, at),) = answers
            assert queued.status_code == 503 and queued.headers["retry-after"] == "1", queued.text
            assert queued.json()["error"]["type"] == "service_unavailable"
            assert at - drained < 5  # not max_wait_s
            start = time.monotonic()
            fresh = chat(router.url, key)  # nothing to wait for: refused at once
            assert fresh.status_code == 503 and fresh.headers["retry-after"] == "1", fresh.text
            assert time.monotonic() - start < 5
            assert httpx.get(f"{router.url}/ready", timeout=5).status_code == 503
        # The drained worker's stream was left to finish; adding it back serves requests again.
        assert admin("POST", router.url, "/admin/workers", json={"url": single.url}).status_code == 200
        assert chat(router.url, key).status_code == 200
    finally:
        if router is not None:
            router.stop()
        single.stop()


def test_a_worker_ejected_by_passive_health_reaches_every_admission_queue_at_once(tmp_path: Path):
    """A release dispatches only its own pool's queue. A pool whose requests fall back on another
    pool, or that has no worker left at all, learned of a passive ejection only at the next health
    round (here a minute away): its waiting requests sat there meanwhile, instead of being refused
    (or seated) at once."""
    import asyncio

    from tokenmill.router.admission import NoCapacity
    from tokenmill.router.app import RouterApp
    from tokenmill.router.gateway import Gateway
    from tokenmill.router.gateway_config import parse_gateway_config
    from tokenmill.router.policies import Router
    from tokenmill.router.workers import EJECT_AFTER, WorkerPool

    async def go() -> None:
        config = {"ledger": "usage.db", "worker_slots": 1, "teams": {"bulk": {"pool": "throughput"}}}
        gateway = Gateway(parse_gateway_config(config, tmp_path))
        pool = WorkerPool(["http://127.0.0.1:9#latency"])  # the throughput pool has none: bulk falls back
        app = RouterApp(pool, Router("round_robin"), health_interval=60, gateway=gateway)
        try:
            queue = gateway.queue("throughput", lambda: app._slots("throughput"))
            await queue.acquire("bulk", 0, 1)  # the one slot the fallback gives
            waiting = asyncio.create_task(queue.acquire("bulk", 0, 1))
            await asyncio.sleep(0)
            assert queue.waiting == 1
            (worker,) = pool.available()
            for _ in range(EJECT_AFTER):  # a request of another pool's failing on it, say
                pool.failed(worker)
            assert not worker.healthy
            with pytest.raises(NoCapacity):  # at once: no worker is left for bulk to fall back on
                await asyncio.wait_for(waiting, 1)
            queue.release(0)
        finally:
            gateway.ledger.close()

    asyncio.run(go())
