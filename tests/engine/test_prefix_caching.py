"""Prefix caching through the engine, on the tiny Llama on CPU: identical outputs, exact statistics,
shared blocks, tenant salts, KV events, and no block leaked whatever state a request is aborted in.

block_size is 8 throughout, so a prompt of ``L`` tokens can hit at most ``(L - 1) // 8`` blocks (its last
token is always computed, to sample from), and only blocks of tokens every prompt shares can hit.
"""

from __future__ import annotations

import pytest

from tests.engine.test_parity import kv_bytes
from tests.tiny_models import drain, hf_greedy, random_prompts
from tokenmill.engine import AllCleared, BlockRemoved, BlockStored, SamplingParams, hash_blocks
from tokenmill.engine.request import RequestStatus

BS = 8
MAX_TOKENS = 8
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)


def engine_for(make_engine, folder, num_blocks: int = 64, **kwargs):
    kwargs.setdefault("max_model_len", 64)
    return make_engine(folder, block_size=BS, kv_cache_memory=kv_bytes(folder, num_blocks, BS), **kwargs)


def cached_tokens(engine, request_id: str) -> list[int]:
    return [r.num_cached_tokens for r in engine.requests_of(request_id)]


P, Q = random_prompts((20, 24), seed=21)  # two shared prefixes: 2 full blocks + 4 tokens, 3 full blocks
S = random_prompts((5, 9, 3, 2, 7, 12), seed=22)  # suffixes
ROUNDS = [
    {"r0": P + S[0]},  # 25 tokens, nothing cached yet
    # A later round hits blocks that a finished request left cached: P's 2 full blocks (16 tokens); the
    # exact copy of r0 hits (25 - 1) // 8 = 3 blocks (24 tokens: its 3rd full block is r0's too).
    {"r1": P + S[1], "r2": P + S[2], "r0copy": P + S[0]},
    # All in one step: q0 registers Q's 3 blocks on admission and q1, q2 hit them in that same step.
    {"q0": Q + S[3], "q1": Q + S[4], "q2": Q + S[5]},
]
ALL = {rid: p for rnd in ROUNDS for rid, p in rnd.items()}
EXPECTED_HITS = {"r0": 0, "r1": 16, "r2": 16, "r0copy": 24, "q0": 0, "q1": 24, "q2": 24}


def run_rounds(engine) -> dict:
    """Each round added at once and run to the end; returns the final output of every request."""
    final = {}
    for rnd in ROUNDS:
        for rid, prompt in rnd.items():
            engine.add_request(rid, prompt, GREEDY)
        if "q0" in rnd:
            outs = engine.step()  # every q prefills in this one step, sampling its first token
            assert {o.request_id for o in outs} == set(rnd) and engine.stats().num_running == 3
            hits = {rid: cached_tokens(engine, rid) for rid in rnd}
            on = engine.config.enable_prefix_caching
            assert hits == {"q0": [0], "q1": [24 if on else 0], "q2": [24 if on else 0]}
        final.update(drain(engine))
        engine.kv_cache.check_invariants()
    assert engine.kv_cache.num_used_blocks == 0
    return final


def test_prefix_caching_changes_no_output_and_matches_transformers(tiny_llama, make_engine):
    results = {}
    for caching in (False, True):
        engine = engine_for(make_engine, tiny_llama, enable_prefix_caching=caching)
        final = run_rounds(engine)
        results[caching] = {rid: out.outputs[0].token_ids for rid, out in final.items()}
        hits = {rid: out.metrics.num_cached_tokens for rid, out in final.items()}
        assert hits == (EXPECTED_HITS if caching else dict.fromkeys(EXPECTED_HITS, 0))
    assert results[True] == results[False]
    for rid, prompt in ALL.items():
        assert results[True][rid] == hf_greedy(tiny_llama, prompt, MAX_TOKENS), rid


def test_prefix_cache_stats_follow_the_block_arithmetic(tiny_llama, make_engine):
    """Queries are the prompt tokens of every admission (25 + 29 + 23 + 25 + 26 + 31 + 36 = 195), hits
    the tokens found: 16 + 16 + 24 + 24 + 24 = 104. With caching off, the same queries find nothing."""
    queries = sum(len(p) for p in ALL.values())
    assert queries == 195 and sum(EXPECTED_HITS.values()) == 104
    engine = engine_for(make_engine, tiny_llama)
    run_rounds(engine)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (195, 104)
    assert stats.prefix_cache_hit_rate == pytest.approx(104 / 195)
    assert stats.num_cached_blocks > 0 and stats.kv_blocks_used == 0

    off = engine_for(make_engine, tiny_llama, enable_prefix_caching=False)
    run_rounds(off)
    stats = off.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_cached_blocks) == (195, 0, 0)
    assert stats.prefix_cache_hit_rate == 0.0


def test_samples_of_one_request_share_the_prompts_blocks(tiny_llama, make_engine):
    """n = 3, prompt P (20 tokens: 3 blocks). All three samples are admitted in the first step: sample 0
    registers P's 2 full blocks, samples 1 and 2 hit them (16 tokens) and compute only their last 4 prompt
    tokens in a block of their own: 2 shared + 3 private = 5 blocks in use, not 3 * 3 = 9."""
    params = SamplingParams(n=3, max_tokens=MAX_TOKENS, temperature=1.0, seed=5)
    outputs = {}
    for caching in (True, False):
        engine = engine_for(make_engine, tiny_llama, enable_prefix_caching=caching)
        engine.add_request("s", P, params)
        engine.step()
        children = engine.requests_of("s")
        tables = [engine.kv_cache.block_table(c.request_id) for c in children]
        assert all(len(t) == 3 for t in tables)
        if caching:
            assert tables[0][:2] == tables[1][:2] == tables[2][:2]
            assert len({t[2] for t in tables}) == 3
            assert engine.kv_cache.num_used_blocks == 5
            assert [c.num_cached_tokens for c in children] == [0, 16, 16]
            assert [c.num_prefill_tokens for c in children] == [20, 4, 4]
        else:
            assert engine.kv_cache.num_used_blocks == 9
        outputs[caching] = [c.token_ids for c in drain(engine)["s"].outputs]
        assert engine.kv_cache.num_used_blocks == 0
    assert outputs[True] == outputs[False]
    assert len({tuple(t) for t in outputs[True]}) > 1, "seeded samples should differ from one another"


def test_cache_salt_keeps_tenants_apart(tiny_llama, make_engine):
    """P (20 tokens) under salt x caches 2 full blocks. The same prompt under salt y, or with no salt,
    hits nothing; under salt x again it hits both (16 tokens). The tokens are the same every time."""
    engine = engine_for(make_engine, tiny_llama)
    expected = {"a": ("x", 0), "b": ("y", 0), "c": (None, 0), "d": ("x", 16)}
    final = {}
    for rid, (salt, _) in expected.items():
        engine.add_request(rid, P, GREEDY, cache_salt=salt)
        final.update(drain(engine))
    assert {rid: (expected[rid][0], out.metrics.num_cached_tokens) for rid, out in final.items()} == expected
    assert len({tuple(out.outputs[0].token_ids) for out in final.values()}) == 1
    assert engine.stats().prefix_cache_hits == 16


def stored_and_removed(batches) -> tuple[list[BlockStored], list[BlockRemoved], list]:
    events = [e for b in batches for e in b.events]
    stored = [e for e in events if isinstance(e, BlockStored)]
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    return stored, removed, events


def test_kv_events_carry_the_hashes_a_router_computes(tiny_llama, make_engine):
    """P (20 tokens) under salt "t", 8 tokens: 27 tokens computed -> 3 full blocks. The 2 full prompt blocks
    are stored on admission with no parent; the 3rd (4 prompt + 4 generated tokens) when decoding fills
    it, with block 1's hash as parent. Every hash is hash_blocks(tokens, 8, "t")."""
    engine = engine_for(make_engine, tiny_llama, kv_events=True)
    engine.add_request("a", P, GREEDY, cache_salt="t")
    engine.step()
    first = engine.take_kv_events()
    assert len(first) == 1
    prompt_hashes = hash_blocks(P, BS, "t")
    assert first[0].events == [BlockStored(prompt_hashes, None, 16, BS)]
    assert first[0].to_dict()["events"][0]["block_hashes"] == prompt_hashes

    out = drain(engine)["a"]
    stored, removed, _ = stored_and_removed(engine.take_kv_events())
    all_hashes = hash_blocks(P + out.outputs[0].token_ids, BS, "t")
    assert all_hashes[:2] == prompt_hashes
    assert stored == [BlockStored(all_hashes[2:3], prompt_hashes[1], 8, BS)] and removed == []
    assert engine.take_kv_events() == []


def test_kv_events_report_evictions_and_reset(tiny_llama, make_engine):
    """6 blocks of 8 (5 usable). a = P, 4 tokens: 23 tokens computed in 3 blocks, 2 full ones cached.
    a finishes and frees tail first: its partial block goes to the uncached list, then its blocks 1, 0.
    b (36 tokens, 5 blocks, shares nothing) takes the 3 uncached blocks, then evicts a's block 1 and block 0
    (least recently freed first): one BlockRemoved, before b's 4 full blocks are stored.
    A copy of b hits (36 - 1) // 8 = 4 blocks; after reset_prefix_cache (AllCleared), another copy none."""
    engine = engine_for(make_engine, tiny_llama, num_blocks=6, max_model_len=40, kv_events=True)
    engine.add_request("a", P, SamplingParams(max_tokens=4, ignore_eos=True))
    drain(engine)
    a_hashes = hash_blocks(P, BS)
    stored, removed, _ = stored_and_removed(engine.take_kv_events())
    assert [h for e in stored for h in e.block_hashes] == a_hashes and removed == []

    (b_prompt,) = random_prompts((36,), seed=23)
    engine.add_request("b", b_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()
    (batch,) = engine.take_kv_events()
    assert batch.events == [
        BlockRemoved([a_hashes[1], a_hashes[0]]),
        BlockStored(hash_blocks(b_prompt, BS), None, 32, BS),
    ]
    drain(engine)

    engine.add_request("b2", b_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    assert drain(engine)["b2"].metrics.num_cached_tokens == 32
    engine.take_kv_events()
    engine.reset_prefix_cache()
    assert [b.events for b in engine.take_kv_events()] == [[AllCleared()]]
    assert engine.stats().num_cached_blocks == 0
    engine.add_request("b3", b_prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    assert drain(engine)["b3"].metrics.num_cached_tokens == 0
    assert engine.kv_cache.num_used_blocks == 0


# -- abort, with shared blocks, in every state ----------------------------------------------------------

SHARED = random_prompts((24,), seed=24)[0]  # 3 full blocks
OTHER = SHARED + random_prompts((4,), seed=25)[0]  # 28 tokens
VICTIM = SHARED + random_prompts((10,), seed=26)[0]  # 34 tokens: hits OTHER's 3 blocks


def status_of(engine, rid: str) -> RequestStatus:
    (r,) = engine.requests_of(rid)
    return r.status


def put_victim_in(state: str, engine_of) -> object:
    """An engine where ``victim`` is in ``state`` and shares blocks with running requests where it can."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    if state == "waiting":
        engine = engine_of(max_num_seqs=1)  # other holds the only seat
        engine.add_request("other", OTHER, params)
        engine.step()
        engine.add_request("victim", VICTIM, params)
        engine.step()
        assert status_of(engine, "victim") == RequestStatus.WAITING
    elif state in ("prefilling", "decoding"):
        # Budget 8: other prefills in 4 steps and registers SHARED's 3 blocks; the victim then hits them
        # (ref_cnt 2) and prefills its other 10 tokens 7 a step, beside other's decode.
        engine = engine_of(max_num_batched_tokens=8)
        engine.add_request("other", OTHER, params)
        for _ in range(4):
            engine.step()
        engine.add_request("victim", VICTIM, params)
        engine.step()
        (victim,) = engine.requests_of("victim")
        assert victim.num_cached_tokens == 24 and victim.num_computed_tokens == 24 + 7
        shared = engine.kv_cache.block_table(victim.request_id)[:3]
        assert all(engine.kv_cache.pool.ref_cnt[b] == 2 for b in shared)
        if state == "decoding":
            engine.step()
            engine.step()
            assert victim.num_output_tokens >= 1 and victim.status == RequestStatus.RUNNING
    else:
        # One seat: the victim runs alone; a request one priority above takes its seat and hits the
        # victim's cached blocks, which the preemption left in the prefix cache.
        engine = engine_of(max_num_seqs=1)
        engine.add_request("victim", VICTIM, params)
        engine.step()
        engine.add_request("other", OTHER, params, priority=1)
        engine.step()
        assert status_of(engine, "victim") == RequestStatus.PREEMPTED
        assert engine.requests_of("other")[0].num_cached_tokens == 24
    return engine


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "preempted"])
def test_abort_in_every_state_leaks_no_block(state, tiny_llama, make_engine):
    engine = put_victim_in(state, lambda **kw: engine_for(make_engine, tiny_llama, **kw))
    kv = engine.kv_cache
    (victim,) = engine.requests_of("victim")
    assert engine.abort("victim")
    assert victim.status == RequestStatus.FINISHED_ABORTED and kv.block_table(victim.request_id) == []
    kv.check_invariants()
    (other,) = engine.requests_of("other")
    assert kv.num_used_blocks == len(kv.block_table(other.request_id))
    assert all(kv.pool.ref_cnt[b] == 1 for b in kv.block_table(other.request_id))
    assert not engine.abort("victim")
    final = drain(engine)
    assert final["other"].finished and engine.stats().kv_blocks_used == 0
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_usable_blocks
