"""Routing policies and worker health, without any network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.router.calibration import StepCost
from tokenmill.router.policies import Router, RouteRequest
from tokenmill.router.workers import EJECT_AFTER, WorkerPool


def pool(n: int) -> WorkerPool:
    return WorkerPool([f"http://127.0.0.1:{9000 + i}" for i in range(n)])


def test_round_robin_takes_each_worker_in_turn():
    p, r = pool(3), Router("round_robin")
    chosen = [r.choose(RouteRequest(10), p.available()).url[-4:] for _ in range(6)]
    assert chosen == ["9000", "9001", "9002"] * 2


def test_least_load_picks_the_fewest_tokens_in_flight():
    p, r = pool(3), Router("least_load")
    a, b, c = p.workers
    p.started(a, 500)
    p.started(b, 100)
    assert r.choose(RouteRequest(50), p.available()) is c
    p.started(c, 300)
    assert r.choose(RouteRequest(50), p.available()) is b


def test_a_request_that_jumps_the_queue_goes_where_the_least_prefill_is_under_way():
    p, r = pool(3), Router("least_load")
    a, b, c = p.workers
    p.started(a, 300)
    a.pending_prefill = 250  # its prompt is being computed now: the step running there is long
    p.started(b, 900)  # a fuller batch, but only decoding
    p.started(c, 900)
    c.pending_prefill = 10
    assert r.choose(RouteRequest(50), p.available()) is a  # by load
    assert r.choose(RouteRequest(50, jumps_queue=True), p.available()) is b  # by the prefill ahead
    b.pending_prefill = 250
    assert r.choose(RouteRequest(50, jumps_queue=True), p.available()) is c
    assert r.decisions == {"least_load": 1, "least_load_jump": 2}


@given(st.lists(st.integers(1, 2000), min_size=1, max_size=60))
def test_least_load_keeps_in_flight_tokens_within_one_request_of_each_other(sizes):
    p, r = pool(4), Router("least_load")
    biggest = max(sizes)
    for tokens in sizes:
        p.started(r.choose(RouteRequest(tokens), p.available()), tokens)
    loads = [w.in_flight_tokens for w in p.workers]
    assert max(loads) - min(loads) <= biggest  # greedy balance: never more than one request apart
    assert sum(loads) == sum(sizes) and sum(w.routed for w in p.workers) == len(sizes)


def test_a_session_sticks_to_its_worker_until_it_is_overloaded():
    p, r = pool(2), Router("round_robin")
    first = r.choose(RouteRequest(10, "s1"), p.available())
    assert all(r.choose(RouteRequest(10, "s1"), p.available()) is first for _ in range(4))
    other = next(w for w in p.workers if w is not first)
    p.started(first, 1000)
    p.started(other, 10)  # first now holds far more than twice the mean
    assert r.choose(RouteRequest(10, "s1"), p.available()) is other
    assert r.decisions["session_overloaded"] == 1


def test_failures_eject_a_worker_and_a_good_check_readmits_it_on_a_ramp():
    p = pool(2)
    w = p.workers[0]
    for _ in range(EJECT_AFTER - 1):
        p.failed(w)
    assert w.healthy
    p.failed(w)
    assert not w.healthy and p.available() == [p.workers[1]]
    p.health(w, ok=True)
    assert w.healthy and w.ramp() < 0.2  # just re-admitted: a small share at first


def test_a_ramping_worker_takes_less_than_its_share():
    p, r = pool(2), Router("least_load")
    fresh = p.workers[1]
    p.health(fresh, ok=False)
    fresh.healthy = False
    p.health(fresh, ok=True)  # re-admitted now
    counts = {w.url: 0 for w in p.workers}
    for _ in range(40):
        w = r.choose(RouteRequest(100), p.available())
        p.started(w, 100)
        counts[w.url] += 1
    assert counts[fresh.url] < 10


def test_drain_and_remove():
    p = pool(2)
    p.drain("http://127.0.0.1:9000/v1")
    assert [w.url for w in p.available()] == ["http://127.0.0.1:9001"]
    p.add("http://127.0.0.1:9000")
    assert len(p.available()) == 2
    p.remove("http://127.0.0.1:9001")
    with pytest.raises(KeyError, match="no worker"):
        p.get("http://127.0.0.1:9001")


@pytest.mark.parametrize("bad", ["localhost:8000", "ftp://x"])
def test_bad_worker_urls_and_policies_are_refused(bad):
    with pytest.raises(ValueError, match="worker URL"):
        WorkerPool([bad])
    with pytest.raises(ValueError, match="policy must be one of"):
        Router("random")


def _prefixed(prefix: str, suffix: str):
    from tokenmill.router.prefix_index import chunk_hashes

    text = prefix + suffix
    return RouteRequest(tokens=len(text) // 4 + 16, prompt_tokens=len(text) // 4, prefix=chunk_hashes(text))


def _route(p: WorkerPool, r: Router, request: RouteRequest, first_byte: bool):
    """Route as the app does: the chosen worker owes the prefill until the first byte comes back."""
    w = r.choose(request, p.available())
    p.started(w, request.tokens)
    if not first_byte:
        w.pending_prefill += r.last_prefill
    return w


def test_prefix_sends_a_shared_prefix_back_to_the_worker_that_has_it():
    p, r = pool(3), Router("prefix")
    system = "You are a careful assistant. " * 100  # ~2,900 characters: 11 chunks
    first = _route(p, r, _prefixed(system, "question one"), first_byte=True)  # now decoding
    again = _route(p, r, _prefixed(system, "question two"), first_byte=True)
    assert again is first and r.decisions == {"prefix_miss": 1, "prefix_hit": 1}
    assert r.predicted_hit_tokens >= 11 * 64 - 64


def test_a_popular_prefix_spreads_once_its_queue_outweighs_what_the_cache_saves():
    p, r = pool(3), Router("prefix")
    system = "Shared system prompt for every tenant. " * 60  # ~2,300 characters
    chosen = [_route(p, r, _prefixed(system, f"user question {i}"), first_byte=False).url for i in range(40)]
    counts = sorted(chosen.count(w.url) for w in p.workers)
    assert counts[0] >= 5  # every worker took a share: no hot spot
    assert counts[-1] <= 28  # the cache holder took the most, but not everything


def test_different_prefixes_spread_and_then_stick():
    p, r = pool(2), Router("prefix")
    a, b = "Tenant A's long instructions. " * 40, "Tenant B's long instructions. " * 40
    wa = _route(p, r, _prefixed(a, "x"), first_byte=False)
    wb = _route(p, r, _prefixed(b, "y"), first_byte=False)
    assert wa is not wb  # the second goes where no prefill is queued
    assert _route(p, r, _prefixed(a, "z"), first_byte=False) is wa
    assert _route(p, r, _prefixed(b, "w"), first_byte=False) is wb


def test_the_prefix_index_is_bounded_and_forgets_a_worker():
    from tokenmill.router.prefix_index import PrefixIndex, chunk_hashes

    index = PrefixIndex(max_entries=10)
    hashes = chunk_hashes("abcdefgh" * 1000)  # 31 chunks
    index.record("w", hashes)
    assert index.matched_chunks("w", hashes) == 0  # its oldest (leading) hashes were evicted first
    index.record("w", hashes[:5])
    assert index.matched_chunks("w", hashes) == 5
    index.forget("w")
    assert index.matched_chunks("w", hashes) == 0


# -- kv: exact block hashes, from the workers' own events --------------------------------------------


def _blocks(n_blocks: int, seed: int = 0, extra_tokens: int = 5):
    from tokenmill.router.prompt_blocks import PromptBlocks

    hashes = [seed * 1_000_000 + i for i in range(n_blocks)]
    return PromptBlocks(n_blocks * 16 + extra_tokens, hashes, 16)


def _kv_request(blocks) -> RouteRequest:
    return RouteRequest(blocks.num_tokens + 16, prompt_tokens=blocks.num_tokens, blocks=blocks)


def test_kv_sends_a_prompt_to_the_worker_whose_events_hold_its_blocks():
    p, r = pool(3), Router("kv")
    holder = p.workers[2]
    blocks = _blocks(40)
    r.kv.apply(
        holder.url, {"type": "BlockStored", "block_hashes": blocks.hashes[:30], "parent_block_hash": None}
    )
    assert r.choose(_kv_request(blocks), p.available()) is holder
    assert r.decisions == {"kv_hit": 1} and r.last_prefill == blocks.num_tokens - 30 * 16
    assert holder.predicted_hit_tokens == r.predicted_hit_tokens == 30 * 16
    r.kv.apply(holder.url, {"type": "BlockRemoved", "block_hashes": blocks.hashes[:1]})  # the first went
    chosen = r.choose(_kv_request(blocks), p.available())
    assert r.decisions["kv_miss"] == 1 and chosen is not holder  # no leading block: nothing usable


def test_kv_expects_blocks_where_it_just_sent_them_so_a_burst_does_not_scatter():
    p, r = pool(4), Router("kv")
    blocks = _blocks(100)
    first = r.choose(_kv_request(blocks), p.available())
    r.kv.expect(first.url, blocks.hashes)  # as the app does until the first byte
    assert r.choose(_kv_request(blocks), p.available()) is first
    r.kv.settle(first.url, blocks.hashes)  # first byte came, but no event said the blocks are there
    assert r.kv.matched_blocks(blocks.hashes, [first.url]) == {first.url: 0}


def test_kv_charges_each_worker_its_own_measured_prefill_speed():
    p, r = pool(2), Router("kv")
    fast, slow = p.workers
    fast.step_cost.cost, slow.step_cost.cost = StepCost(0.0, 1e-5), StepCost(0.0, 1e-4)
    p.started(fast, 100)
    fast.pending_prefill = 4000  # 0.04 s of prefill queued on the fast worker
    blocks = _blocks(50)  # 805 uncached tokens: 0.008 s more there, 0.08 s on the idle slow one
    assert r.choose(_kv_request(blocks), p.available()) is fast
    fast.step_cost.cost = StepCost(0.0, 1e-4)  # now equally slow: the queue decides
    assert r.choose(_kv_request(blocks), p.available()) is slow


def test_kv_without_blocks_routes_by_text_chunks_and_load():
    p, r = pool(2), Router("kv")
    p.started(p.workers[0], 100)
    p.workers[0].pending_prefill = 100
    assert r.choose(RouteRequest(50, prompt_tokens=40), p.available()) is p.workers[1]
    assert r.decisions == {"kv_cold_miss": 1}
    system = "A long new system prompt, not tokenized yet. " * 60
    first = r.choose(_prefixed(system, "one"), p.available())
    assert r.choose(_prefixed(system, "two"), p.available()) is first  # a burst of it lands together
    assert r.decisions == {"kv_cold_miss": 2, "kv_cold_hit": 1}


def test_kv_replicates_a_popular_prefix_once_the_holders_batch_costs_more_than_a_prefill():
    p, r = pool(3), Router("kv")
    for w in p.workers:
        w.step_cost.cost = StepCost(0.004, 4e-5, 1e-6)  # the demo CPU profile's costs
    blocks = _blocks(160)  # 2,565 tokens, held by the first worker
    holder = p.workers[0]
    r.kv.apply(holder.url, {"type": "BlockStored", "block_hashes": blocks.hashes})
    chosen = []
    for _ in range(36):
        w = r.choose(_kv_request(blocks), p.available())
        p.started(w, blocks.num_tokens + 16, 16)
        r.kv.expect(w.url, blocks.hashes)  # as the app does: held there from now on
        chosen.append(w)
    assert chosen[0] is holder  # an empty batch: the cache wins
    counts = [chosen.count(w) for w in p.workers]
    assert min(counts) >= 8 and max(counts) <= 16  # then the prefix spread, over replicas
    assert r.decisions["kv_miss"] == 2  # one prefill per new replica, no more


def test_kv_counts_a_request_of_n_sequences_as_n_decoding_side_by_side():
    p, r = pool(2), Router("kv")
    holder, other = p.workers
    for w in p.workers:
        w.step_cost.cost = StepCost(0.004, 4e-5, 0.0)
    blocks = _blocks(125)  # 2,005 tokens, held by the first worker: 0.08 s of prefill saved there
    r.kv.apply(holder.url, {"type": "BlockStored", "block_hashes": blocks.hashes})
    n8 = RouteRequest(
        blocks.num_tokens + 8 * 64, prompt_tokens=blocks.num_tokens, blocks=blocks, sequences=8, choices=8
    )
    for _ in range(5):
        p.started(holder, 100, 64)
    # 65 steps, not 513: five more sequences in each step there cost less than the prefill saved.
    assert r.choose(n8, p.available()) is holder
    for _ in range(5):
        p.finished(holder, 100, 64)
        p.started(holder, 100, 8 * 64, 8)
    # Five requests of n=8 make a batch of 40, not of 5: now the prefill is cheaper than the batch.
    assert holder.in_flight_sequences == 40
    assert r.choose(n8, p.available()) is other


def test_the_pool_version_moves_with_every_change_to_what_is_available():
    """What is derived from the available workers (the gateway's capacity) is cached against it."""
    p = pool(2)
    w = p.workers[0]
    seen = [p.version]

    def changed() -> bool:
        seen.append(p.version)
        return seen[-1] != seen[-2]

    p.started(w, 10)
    p.finished(w, 10)
    assert not changed()  # load is not availability
    p.set_slots(w, 8)
    assert changed()
    p.set_slots(w, 8)
    assert not changed()
    p.failed(w)
    assert not changed()  # one failure does not eject
    for _ in range(5):
        p.failed(w)
    assert not w.healthy and changed()
    p.health(w, ok=True)
    assert changed()
    p.drain(w.url)
    assert changed()
    p.add(w.url)
    assert changed()
    p.remove(w.url)
    assert changed()
