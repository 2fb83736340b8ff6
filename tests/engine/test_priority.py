"""Priority scheduling: queue order, preemption by priority (gap, watermark, sequence limit, victim choice),
the fcfs policy, and a preempted request's place in line.

CPU-only with fake model outputs (the helpers of ``test_scheduler``), then once through the engine on the
tiny Llama. ``block_size`` is 4; block 0 is the null block, so ``num_blocks=N`` gives ``N - 1`` usable blocks.
A request holding ``t`` tokens of KV owns ``ceil(t / 4)`` blocks.
"""

from __future__ import annotations

import logging

import pytest

from tests.engine.test_parity import kv_bytes
from tests.engine.test_scheduler import make_scheduler, new_ids, req, step
from tests.tiny_models import hf_greedy, random_prompts
from tokenmill.engine import SamplingParams
from tokenmill.engine.request import RequestStatus


def waiting_ids(sched) -> list[str]:
    return [r.request_id for r in sched.waiting]


def test_waiting_queue_orders_by_priority_then_arrival():
    """max_num_seqs 1 and max_tokens 1: one request runs per step, so admissions show the queue's order.
    Priorities a 0, b 2, c 1, d 2, e 0, then f 1 arrives last: b d c f a e."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=1)
    for rid, priority in [("a", 0), ("b", 2), ("c", 1), ("d", 2), ("e", 0)]:
        sched.add_request(req(rid, 4, max_tokens=1, priority=priority))
    assert waiting_ids(sched) == ["b", "d", "c", "a", "e"]
    sched.add_request(req("f", 4, max_tokens=1, priority=1))
    assert waiting_ids(sched) == ["b", "d", "c", "f", "a", "e"]
    admitted = [new_ids(step(sched)[0]) for _ in range(6)]
    assert admitted == [["b"], ["d"], ["c"], ["f"], ["a"], ["e"]]
    assert not sched.has_unfinished_requests() and sched.num_preemptions == 0


def test_higher_priority_takes_the_last_seat():
    """max_num_seqs 1, 19 usable blocks (blocks are no constraint). low (priority 0, prompt 4) runs.
    high (priority 1, prompt 4, 2 tokens) arrives: the only seat is taken, so low is preempted, its decode
    taken out of the step, and high prefills its 4 tokens instead. low's one full block stays cached.
    step 3: high decodes its 2nd token and finishes. step 4: low (4 + 1 tokens) resumes from its cached
    block ((5 - 1) // 4 = 1 block, 4 tokens) and computes 1 token."""
    sched, kv = make_scheduler(num_blocks=20, max_num_seqs=1)
    low = req("low", 4)
    sched.add_request(low)
    step(sched)
    high = req("high", 4, max_tokens=2, priority=1)
    sched.add_request(high)
    out, _ = step(sched)
    assert out.preempted_request_ids == {"low"} and new_ids(out) == ["high"]
    assert out.num_scheduled_tokens == {"high": 4}
    assert low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0
    assert kv.block_table("low") == [] and kv.num_used_blocks == 1 and waiting_ids(sched) == ["low"]
    out, upd = step(sched)
    assert out.num_scheduled_tokens == {"high": 1} and upd["high"].finished
    out, _ = step(sched)
    assert new_ids(out) == ["low"] and out.num_scheduled_tokens == {"low": 1}
    assert out.new_requests[0].num_computed_tokens == 4


def test_higher_priority_preempts_when_the_blocks_run_out():
    """block_size 4, 2 usable blocks, 8 seats. low (prompt 7) fills both blocks and samples (8 tokens: its
    decode still fits). high (priority 1, prompt 4: 1 block) finds 0 free: low is preempted. Its blocks are
    freed tail first: the partial 2nd goes to the uncached list and high takes it; the full 1st stays
    cached."""
    sched, kv = make_scheduler(num_blocks=3)
    low = req("low", 7)
    sched.add_request(low)
    step(sched)
    first, second = kv.block_table("low")
    assert kv.num_free_blocks == 0
    sched.add_request(req("high", 4, priority=1))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"low"} and new_ids(out) == ["high"]
    assert out.num_scheduled_tokens == {"high": 4} and kv.block_table("high") == [second]
    assert kv.pool.block_hash[first] is not None and kv.num_free_blocks == 1


def test_victim_is_the_lowest_priority_then_the_fewest_computed_tokens():
    """block_size 4, 4 usable blocks. a (priority 0, prompt 3: 1 block), b (priority 1, prompt 3: 1 block),
    c (priority 0, prompt 7: 2 blocks) fill the pool; after step 1 a and b hold 4 tokens (3 computed), c 8
    (7 computed), and each decode fits its blocks. high (priority 2, prompt 3: 1 block) may preempt any of
    them (all are <= 1). Lowest priority: a and c; fewest computed tokens: a (3 < 7), although a is older
    than c and b has as few tokens as a."""
    sched, _ = make_scheduler(num_blocks=5)
    for rid, prompt_len, priority in [("a", 3, 0), ("b", 3, 1), ("c", 7, 0)]:
        sched.add_request(req(rid, prompt_len, priority=priority))
    step(sched)
    sched.add_request(req("high", 3, priority=2))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"a"} and new_ids(out) == ["high"]
    assert out.num_scheduled_tokens == {"b": 1, "c": 1, "high": 3}


def test_victim_ties_go_to_the_newest():
    """2 usable blocks: a then b (priority 0, prompt 3: 1 block each) tie on priority and computed tokens
    (3). high (priority 1, prompt 3) preempts the newer, b."""
    sched, _ = make_scheduler(num_blocks=3)
    sched.add_request(req("a", 3))
    sched.add_request(req("b", 3))
    step(sched)
    sched.add_request(req("high", 3, priority=1))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"b"} and out.num_scheduled_tokens == {"a": 1, "high": 3}


@pytest.mark.parametrize("gap", [1, 2])
def test_preemption_priority_gap(gap):
    """max_num_seqs 1, blocks plenty. low (priority 0) runs; mid (priority 1) arrives. With gap 1 mid
    preempts low. With gap 2 mid is only 1 above: nobody is preempted and mid waits; then high (priority
    2) arrives, goes ahead of mid and, 2 above low, preempts it: waiting = [mid, low]."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=1, gap=gap)
    low = req("low", 4, max_tokens=20)
    sched.add_request(low)
    step(sched)
    mid = req("mid", 4, priority=1)
    sched.add_request(mid)
    out, _ = step(sched)
    if gap == 1:
        assert out.preempted_request_ids == {"low"} and new_ids(out) == ["mid"]
        return
    assert out.preempted_request_ids == set() and out.num_scheduled_tokens == {"low": 1}
    assert mid.status == RequestStatus.WAITING and sched.num_preemptions == 0
    sched.add_request(req("high", 4, priority=2))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"low"} and new_ids(out) == ["high"]
    assert waiting_ids(sched) == ["mid", "low"]


@pytest.mark.parametrize("watermark", [0.0, 0.25])
def test_watermark_keeps_blocks_free_while_something_runs(watermark):
    """8 usable blocks; watermark 0.25 keeps ceil(0.25 * 8) = 2 free once anything runs. In one step:
    a (prompt 8: 2 blocks) enters an empty batch; b (prompt 16: 4 blocks) leaves 8 - 2 - 4 = 2 free, just
    the watermark; c (prompt 4: 1 block) would leave 1 < 2, so it waits (all priority 0: no preemption).
    With watermark 0, c is admitted and 1 block is left."""
    sched, kv = make_scheduler(num_blocks=9, watermark=watermark)
    for rid, prompt_len in [("a", 8), ("b", 16), ("c", 4)]:
        sched.add_request(req(rid, prompt_len))
    out, _ = step(sched)
    if watermark:
        assert new_ids(out) == ["a", "b"] and kv.num_free_blocks == 2 and waiting_ids(sched) == ["c"]
    else:
        assert new_ids(out) == ["a", "b", "c"] and kv.num_free_blocks == 1
    assert out.preempted_request_ids == set()


def test_a_lone_request_may_use_the_whole_pool_despite_the_watermark():
    """8 usable blocks, watermark 0.25 (2 blocks). Nothing runs, so d (prompt 31: 8 blocks, its one
    decode fits the 32nd slot) is admitted into the whole pool."""
    sched, kv = make_scheduler(num_blocks=9, watermark=0.25)
    d = req("d", 31, max_tokens=2)
    sched.add_request(d)
    out, _ = step(sched)
    assert new_ids(out) == ["d"] and kv.num_free_blocks == 0
    _, upd = step(sched)
    assert upd["d"].finished and d.num_preemptions == 0 and kv.num_used_blocks == 0


def test_a_preempted_request_keeps_its_place_in_line():
    """max_num_seqs 2, blocks plenty. w then a (priority 0, prompt 4) run; b (priority 0) arrives after
    them and waits for a seat. h1 (priority 1) takes a seat: w and a tie, the newer a goes, and returns
    ahead of b, which arrived after it: [a, b]. h2 (priority 1) preempts w (h1 outranks it): w arrived
    first of all and goes to the front: [w, a, b]. Every preemption is counted on the scheduler and on
    the request."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=2)
    w, a = req("w", 4, max_tokens=20), req("a", 4, max_tokens=20)
    sched.add_request(w)
    sched.add_request(a)
    step(sched)
    sched.add_request(req("b", 4))
    step(sched)
    assert waiting_ids(sched) == ["b"]
    sched.add_request(req("h1", 4, max_tokens=20, priority=1))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"a"} and waiting_ids(sched) == ["a", "b"]
    sched.add_request(req("h2", 4, max_tokens=20, priority=1))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"w"} and waiting_ids(sched) == ["w", "a", "b"]
    assert (sched.num_preemptions, w.num_preemptions, a.num_preemptions) == (2, 1, 1)


def test_fcfs_ignores_priorities_and_never_preempts():
    """fcfs, max_num_seqs 1. low runs; low2 (priority 0) then high (priority 5) arrive. fcfs is first come,
    first served: high queues behind low2 and waits for the seat, with no preemption, though it outranks
    both."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=1, policy="fcfs")
    sched.add_request(req("low", 4, max_tokens=3))
    step(sched)
    sched.add_request(req("low2", 4))
    sched.add_request(req("high", 4, priority=5))
    assert waiting_ids(sched) == ["low2", "high"]
    for _ in range(2):
        out, _ = step(sched)
        assert out.preempted_request_ids == set() and list(out.num_scheduled_tokens) == ["low"]
    out, _ = step(sched)
    assert new_ids(out) == ["low2"] and sched.num_preemptions == 0


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "new"), ("priority", "old")])
def test_growth_preempts_the_newest_under_fcfs_and_the_lowest_priority_otherwise(policy, victim):
    """block_size 4, 3 usable blocks. old (priority 0, prompt 3: 1 block) runs; in step 2 new (priority 9,
    prompt 6: 2 blocks) joins and the pool is full. In step 3 old's 5th token needs a 2nd block and none
    is free (new's 7 tokens fit its 2). fcfs preempts the newest running request, new, despite its
    priority, and old takes one of its blocks; priority preempts the lowest priority, old itself."""
    sched, kv = make_scheduler(num_blocks=4, policy=policy)
    sched.add_request(req("old", 3))
    step(sched)
    sched.add_request(req("new", 6, priority=9))
    step(sched)
    assert kv.num_free_blocks == 0
    out, _ = step(sched)
    survivor = "old" if victim == "new" else "new"
    assert out.preempted_request_ids == {victim} and list(out.num_scheduled_tokens) == [survivor]
    assert new_ids(out) == [] and waiting_ids(sched) == [victim]
    assert len(kv.block_table(survivor)) == 2 and kv.block_table(victim) == []


def test_every_preemption_is_counted_and_logged(caplog):
    """max_num_seqs 1. low runs; h1 (priority 1, 1 token) preempts it and finishes in that step; low
    resumes; h2 (priority 1) preempts it again: 2 preemptions of the same request, 2 log lines."""
    caplog.set_level(logging.INFO, logger="tokenmill.engine.scheduler")
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=1)
    low = req("low", 4, max_tokens=20)
    sched.add_request(low)
    step(sched)
    for rid in ("h1", "h2"):
        sched.add_request(req(rid, 4, max_tokens=1, priority=1))
        out, upd = step(sched)
        assert out.preempted_request_ids == {"low"} and upd[rid].finished
        out, _ = step(sched)
        assert new_ids(out) == ["low"]
    assert sched.num_preemptions == 2 and low.num_preemptions == 2
    lines = [
        r
        for r in caplog.records
        if r.name == "tokenmill.engine.scheduler" and r.getMessage().startswith("preempted")
    ]
    assert len(lines) == 2 and all(r.levelno == logging.INFO for r in lines)
    assert all("preempted low (priority 0" in r.getMessage() for r in lines)


def test_nobody_is_preempted_in_vain():
    """block_size 4, 3 usable blocks. low (priority 0, prompt 3: 1 block) and mid (priority 5, prompt 7:
    2 blocks) fill the pool. high (priority 3, prompt 12: 3 blocks) outranks only low, and preempting low
    would free 1 block, 2 short: nobody is preempted, high waits."""
    sched, _ = make_scheduler(num_blocks=4)
    sched.add_request(req("low", 3))
    sched.add_request(req("mid", 7, priority=5))
    step(sched)
    high = req("high", 12, priority=3)
    sched.add_request(high)
    out, _ = step(sched)
    assert out.preempted_request_ids == set() and out.num_scheduled_tokens == {"mid": 1, "low": 1}
    assert high.status == RequestStatus.WAITING and sched.num_preemptions == 0


def test_nobody_is_preempted_for_blocks_that_others_share():
    """block_size 4, 4 usable blocks, prefix caching on. mid (priority 5, prompt P: 8 tokens) registers its
    2 blocks; low (priority 0, prompt P + 1) hits both ((9 - 1) // 4 = 2) and adds 1 of its own: 3 used.
    Step 2: mid's 9th token takes the 4th block. high (priority 3, prompt 8: 2 blocks) outranks low only,
    but low's first 2 blocks are mid's too (ref_cnt 2): preempting low frees 1 block, 1 short of 2."""
    sched, kv = make_scheduler(num_blocks=5)
    prompt = list(range(500, 508))
    sched.add_request(req("mid", 8, priority=5, prompt=prompt))
    sched.add_request(req("low", 9, prompt=[*prompt, 9]))
    out, _ = step(sched)
    assert out.new_requests[1].num_computed_tokens == 8 and kv.num_used_blocks == 3
    step(sched)
    assert kv.num_free_blocks == 0
    sched.add_request(req("high", 8, priority=3))
    out, _ = step(sched)
    assert out.preempted_request_ids == set() and new_ids(out) == []
    assert sched.num_preemptions == 0


def test_as_many_victims_as_needed_are_preempted():
    """3 usable blocks. low1, low2 (priority 0) and mid (priority 5), prompt 3 each: 1 block each.
    high (priority 3, prompt 8: 2 blocks) outranks both lows, and preempting both frees the 2 it needs:
    the newer low2 goes first, then low1, and high runs beside mid."""
    sched, _ = make_scheduler(num_blocks=4)
    for rid, priority in [("low1", 0), ("low2", 0), ("mid", 5)]:
        sched.add_request(req(rid, 3, priority=priority))
    step(sched)
    sched.add_request(req("high", 8, priority=3))
    out, _ = step(sched)
    assert out.preempted_request_ids == {"low1", "low2"} and new_ids(out) == ["high"]
    assert out.num_scheduled_tokens == {"mid": 1, "high": 8}
    assert waiting_ids(sched) == ["low1", "low2"] and sched.num_preemptions == 2


# -- through the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("short_of", ["seats", "blocks"])
def test_preempted_requests_resume_with_identical_greedy_tokens(short_of, tiny_llama, make_engine):
    """block_size 8, watermark 0, max_model_len 48. low0 and low1 (prompts 20: 3 blocks each) run; after
    2 steps high (priority 1, prompt 12: 2 blocks, 4 tokens) arrives. seats: max_num_seqs 2, 8 usable
    blocks; blocks: 8 seats, 7 usable blocks (1 free). Either way low1 (the newer of two equal lows) is
    preempted, high runs and finishes first, and low1 resumes later from its cached blocks. Every token
    equals transformers' greedy continuation."""
    seats = short_of == "seats"
    engine = make_engine(
        tiny_llama,
        block_size=8,
        kv_cache_memory=kv_bytes(tiny_llama, 9 if seats else 8, 8),
        max_num_seqs=2 if seats else 8,
        kv_watermark=0.0,
        max_model_len=48,
    )
    prompts = dict(zip(["low0", "low1", "high"], random_prompts((20, 20, 12), seed=31), strict=True))
    low_params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine.add_request("low0", prompts["low0"], low_params)
    engine.add_request("low1", prompts["low1"], low_params)
    engine.step()
    engine.step()
    engine.add_request("high", prompts["high"], SamplingParams(max_tokens=4, ignore_eos=True), priority=1)
    finished_at, final, n = {}, {}, 0
    while engine.has_unfinished_requests():
        n += 1
        assert n < 200
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id], final[out.request_id] = n, out
    assert finished_at["high"] < min(finished_at["low0"], finished_at["low1"])
    assert final["low1"].metrics.num_preemptions >= 1 and final["high"].metrics.num_preemptions == 0
    assert engine.stats().num_preemptions >= 1
    assert final["low1"].metrics.num_cached_tokens == 0  # a resume from the cache is not a prefix query
    for rid, prompt in prompts.items():
        want = hf_greedy(tiny_llama, prompt, len(final[rid].outputs[0].token_ids))
        assert final[rid].outputs[0].token_ids == want, rid
    assert engine.kv_cache.num_used_blocks == 0
    engine.kv_cache.check_invariants()
