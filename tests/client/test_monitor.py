"""The client's monitor: spread over workers, and the warnings that the client itself is the bottleneck."""

from __future__ import annotations

import asyncio
import itertools
import time

from tokenmill.client.monitor import Monitor


def test_counts_per_worker_and_endpoint_and_the_imbalance():
    m = Monitor()
    for worker in ("w0", "w0", "w0", "w1"):
        m.record("http://a", worker, ttft=0.01, latency=0.1, prompt_tokens=5, completion_tokens=10)
    m.record("http://a", None, ttft=None, latency=0.2, error="connect")  # no answer: the endpoint only
    report = m.report(concurrency_limit=8)
    assert {w.name: w.requests for w in report.workers} == {"w0": 3, "w1": 1}
    assert report.endpoints[0].requests == 5 and report.endpoints[0].errors == 1
    assert report.request_imbalance == 1.5 and report.token_imbalance == 1.5
    assert report.errors_by_kind == {"connect": 1}
    assert "w0" in report.table()


def watch(states, block_s: float = 0.0) -> Monitor:
    async def run() -> Monitor:
        m = Monitor(tick_s=0.001)
        cycle = itertools.cycle(states)
        m.start(lambda: next(cycle))
        for _ in range(20 if block_s else 120):
            await asyncio.sleep(0.002)
            if block_s:
                time.sleep(block_s)  # a callback hogging the loop
        await m.stop()
        return m

    return asyncio.run(run())


def test_idle_slots_between_queued_bursts_warn_that_the_producer_is_the_bottleneck():
    report = watch([(True, False), (False, True)]).report(8)
    assert report.starved_fraction is not None and 0.3 < report.starved_fraction < 0.7
    assert any("nothing to send" in w for w in report.warnings)


def test_idle_slots_alone_are_no_warning():
    report = watch([(True, False)]).report(8)  # a light user: nothing ever queued
    assert report.starved_fraction == 1.0
    assert not report.warnings


def test_a_busy_event_loop_warns():
    report = watch([(False, False)], block_s=0.06).report(8)
    assert report.loop_lag_p99_s is not None and report.loop_lag_p99_s > 0.05
    assert any("event loop lag" in w for w in report.warnings)


def test_the_table_adds_up_to_every_request_with_a_row_for_those_no_worker_answered():
    m = Monitor()
    m.record("http://a", "w0", ttft=0.01, latency=0.1, completion_tokens=10)
    m.record("http://a", "w0", ttft=None, latency=0.1, error="client_error")  # a refusal: its worker's
    m.record("http://b", None, ttft=None, latency=0.2, error="connect")
    m.record("http://b", None, ttft=None, latency=0.2, error="connect")
    rows = {line.split()[0] + (line.split()[1] if line.startswith("(") else ""): line.split()
            for line in m.report(8).table().splitlines()[1:] if not line.startswith("imbalance")}  # fmt: skip
    assert rows["w0"][1:3] == ["2", "1"]
    assert rows["(noanswer)"][2:4] == ["2", "2"]
