"""Metric formulas on hand-made records: every number below is worked out in the test."""

from __future__ import annotations

import pytest

from tokenmill.bench.metrics import SLO, Distribution, summarize
from tokenmill.bench.records import RequestRecord


def record(i, intended, sent, times, tokens=None, end=None, **kw):
    messages = [(t, n) for t, n in zip(times, tokens or [1] * len(times), strict=True)]
    counted = sum(n for _, n in messages)
    return RequestRecord(
        i, intended, sent=sent, first_byte=sent, end=end if end is not None else times[-1], status=200,
        messages=messages, output_tokens=kw.pop("output_tokens", counted), counted_output_tokens=counted,
        prompt_tokens=kw.pop("prompt_tokens", 10), **kw,
    )  # fmt: skip


def test_open_loop_latencies_count_from_the_intended_send():
    # Intended at 1.0, sent late at 1.5: TTFT is 2.0 - 1.0 = 1.0, not 0.5 (no coordinated omission).
    r = record(0, 1.0, 1.5, [2.0, 2.1, 2.2, 2.3], end=2.4)
    s = summarize([r])
    assert s.ttft.mean == pytest.approx(1.0)
    assert s.schedule_lag.mean == pytest.approx(0.5)
    assert s.e2e.mean == pytest.approx(1.4)
    assert s.tpot.mean == pytest.approx(0.1)  # (2.3 - 2.0) / (4 - 1)


def test_closed_loop_latencies_count_from_the_actual_send():
    s = summarize([record(0, None, 1.5, [2.0, 2.1], end=2.2)])
    assert s.ttft.mean == pytest.approx(0.5) and s.schedule_lag is None and s.offered_rate is None


def test_itl_spreads_a_gap_over_the_tokens_of_its_message():
    # Messages of 1, 2 and 1 tokens at 0.1, 0.3, 0.4: ITLs 0.1, 0.1 (0.2 over 2 tokens), 0.1.
    r = record(0, None, 0.0, [0.1, 0.3, 0.4], tokens=[1, 2, 1])
    s = summarize([r])
    assert s.itl.count == 3 and s.itl.mean == pytest.approx(0.1)
    assert s.tpot.mean == pytest.approx(0.1)  # (0.4 - 0.1) / (4 - 1)
    assert s.per_user_tok_s.mean == pytest.approx(10.0)


def test_throughput_counts_successful_requests_over_the_run():
    ok = [record(i, None, 0.0, [0.5, 1.0], output_tokens=2, prompt_tokens=100, end=2.0) for i in range(3)]
    failed = RequestRecord(3, None, sent=0.0, end=1.0, status=500, error_kind="http_5xx", error="boom")
    s = summarize([*ok, failed])
    assert (s.requests, s.succeeded, s.failed, s.errors) == (4, 3, 1, {"http_5xx": 1})
    assert s.duration_s == 2.0
    assert s.request_tput == pytest.approx(1.5)
    assert s.output_tok_s == pytest.approx(3.0) and s.input_tok_s == pytest.approx(150.0)
    assert s.total_tok_s == pytest.approx(153.0)


def test_goodput_counts_requests_meeting_every_slo():
    fast = record(0, None, 0.0, [0.1, 0.2, 0.3])  # TTFT 0.1, TPOT 0.1
    slow_start = record(1, None, 0.0, [0.5, 0.6, 0.7])  # TTFT 0.5
    slow_decode = record(2, None, 0.0, [0.1, 0.5, 0.9])  # TPOT 0.4
    s = summarize([fast, slow_start, slow_decode], SLO.parse("ttft=0.3,tpot=100ms"))
    assert s.good == 1 and s.good_fraction == pytest.approx(1 / 3)
    assert s.goodput == pytest.approx(1 / 0.9)


def test_a_run_whose_sends_lag_is_marked_invalid():
    records = [record(i, i * 0.01, i * 0.01 + 0.05, [1.0 + i, 1.1 + i]) for i in range(10)]
    s = summarize(records, max_lag_p99=0.010)
    assert not s.valid and "50.0 ms" in s.invalid_reason
    assert summarize(records, max_lag_p99=0.1).valid


def test_workers_and_their_imbalance():
    records = [record(i, None, 0.0, [0.1, 0.2], worker=w) for i, w in enumerate("aaab")]
    s = summarize(records)
    assert s.workers == {"a": {"requests": 3, "output_tokens": 6}, "b": {"requests": 1, "output_tokens": 2}}
    assert s.worker_imbalance == pytest.approx(1.5)  # 3 / mean 2


def test_token_count_mismatches_are_counted():
    asked_more = record(0, None, 0.0, [0.1, 0.2], expected_output_tokens=5)
    usage_disagrees = record(1, None, 0.0, [0.1, 0.2], output_tokens=3)
    fine = record(2, None, 0.0, [0.1, 0.2], expected_output_tokens=2)
    assert summarize([asked_more, usage_disagrees, fine]).token_mismatches == 2


def test_distribution_percentiles_interpolate_like_numpy():
    d = Distribution.of([float(v) for v in range(1, 101)])
    assert (d.median, d.p90, d.p99, d.max, d.min) == pytest.approx((50.5, 90.1, 99.01, 100.0, 1.0))
    assert Distribution.of([]) is None


@pytest.mark.parametrize(
    "text", ["", "ttft", "ttft=abc", "latency=1", "ttft=-1", "ttft=inf", "ttft=nan", "ttft=1,ttft=2"]
)
def test_bad_slos_name_the_problem(text):
    with pytest.raises(ValueError, match="--slo"):
        SLO.parse(text)


def test_workers_imbalance_counts_tokens_too():
    # Requests spread evenly (2 and 2), tokens not (2 + 2 against 6 + 6): max/mean 12 / 8.
    records = [record(i, None, 0.0, [0.1, 0.2], worker="a") for i in range(2)]
    records += [record(i + 2, None, 0.0, [0.1, 0.2], tokens=[1, 5], worker="b") for i in range(2)]
    s = summarize(records)
    assert s.worker_imbalance == pytest.approx(1.0) and s.worker_token_imbalance == pytest.approx(1.5)


def test_messages_without_tokens_stay_out_of_ttft_tpot_and_itl():
    # A role-only event at 0.05, tokens at 0.1 and 0.3, then usage and [DONE] at 0.31, 0.32.
    r = record(0, None, 0.0, [0.05, 0.1, 0.3, 0.31, 0.32], tokens=[0, 1, 1, 0, 0], end=0.32)
    s = summarize([r], SLO(itl=0.25))
    assert s.ttft.mean == pytest.approx(0.1) and s.tpot.mean == pytest.approx(0.2)
    assert s.itl.count == 1 and s.itl.mean == pytest.approx(0.2) and s.good == 1
    assert (r.first_token, r.last_token, len(r.content)) == (0.1, 0.3, 2)


def test_waiting_for_a_max_concurrency_slot_is_not_schedule_lag():
    # Every 0.1 s; each waited 0.2 s for a slot, then went out within 1 ms of getting it.
    records = [record(i, i * 0.1, i * 0.1 + 0.201, [i * 0.1 + 0.3], queued=0.2) for i in range(10)]
    s = summarize(records, max_lag_p99=0.010)
    assert s.valid and s.schedule_lag.max == pytest.approx(0.001)
    assert s.queue_wait.mean == pytest.approx(0.2) and s.queued == 10
    assert s.ttft.mean == pytest.approx(0.3)  # from the intended send: the wait is in it
    assert s.achieved_rate == pytest.approx(s.offered_rate) == pytest.approx(10.0)
