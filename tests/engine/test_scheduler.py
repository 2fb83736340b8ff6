"""Scheduler: CPU-only, with fake model outputs (no tensors).

Every test states its block arithmetic. ``block_size`` is small (4) so a few tokens cross block boundaries;
block 0 is the null block, so ``num_blocks=N`` gives ``N - 1`` usable blocks.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

EOS = 1
TOKEN = 7  # what the fake model samples unless told otherwise


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 64,
    max_model_len: int = 64,
    policy: str = "priority",
    gap: int = 1,
    watermark: float = 0.0,
    prefix_caching: bool = True,
) -> tuple[Scheduler, KVCacheManager]:
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, policy, gap, watermark)
    return Scheduler(config, kv), kv


_prompt_bases = itertools.count(1)


def req(
    rid: str,
    prompt_len: int,
    max_tokens: int = 8,
    priority: int = 0,
    prompt: list[int] | None = None,
    **params,
) -> Request:
    """A request whose prompt shares no block with any other request's, unless ``prompt`` is given."""
    base = 1000 * next(_prompt_bases)
    return Request(
        rid,
        prompt_token_ids=list(prompt) if prompt is not None else list(range(base, base + prompt_len)),
        sampling_params=SamplingParams(**params),
        eos_token_ids=frozenset({EOS}),
        max_tokens=max_tokens,
        priority=priority,
    )


def fake_output(
    sched: Scheduler, out: SchedulerOutput, tokens: dict[str, int] | None = None
) -> ModelRunnerOutput:
    """What a runner returns: a token for each request whose scheduled tokens reach the end of its tokens."""
    sampled = {}
    for rid, n in out.num_scheduled_tokens.items():
        r = sched.requests[rid]
        if r.num_computed_tokens + n == r.num_tokens:
            sampled[rid] = (tokens or {}).get(rid, TOKEN)
    return ModelRunnerOutput(sampled_token_ids=sampled)


def step(sched: Scheduler, tokens: dict[str, int] | None = None):
    out = sched.schedule()
    updates = sched.update_from_output(out, fake_output(sched, out, tokens))
    sched.kv_cache.check_invariants()
    return out, {u.request.request_id: u for u in updates}


def new_ids(out: SchedulerOutput) -> list[str]:
    return [n.request_id for n in out.new_requests]


def cached_new_blocks(out: SchedulerOutput) -> dict[str, int]:
    return {c.request_id: len(c.new_block_ids) for c in out.cached_requests}


def test_continuous_batching_request_joins_mid_flight():
    """block_size 4, 9 usable blocks.

    step 1: a (prompt 6) prefills 6 tokens -> ceil(6/4) = 2 blocks; samples its 1st token.
    step 2: b (prompt 3) arrives. a decodes 1 (7 tokens, still 2 blocks, 0 new); b prefills 3 -> 1 block.
    step 3: a decodes (8 tokens, 2 blocks); b decodes (4 tokens, 1 block): no new blocks.
    step 4: a at 9 tokens needs a 3rd block, b at 5 tokens a 2nd; a reaches max_tokens=4 and frees its 3.
    """
    sched, kv = make_scheduler(num_blocks=10)
    a = req("a", 6, max_tokens=4)
    sched.add_request(a)
    out, upd = step(sched)
    assert new_ids(out) == ["a"] and out.num_scheduled_tokens == {"a": 6}
    assert len(out.new_requests[0].block_ids) == 2 and upd["a"].new_token_ids == [TOKEN]

    b = req("b", 3)
    sched.add_request(b)
    out, upd = step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 3}
    assert cached_new_blocks(out) == {"a": 0} and new_ids(out) == ["b"]
    assert len(out.new_requests[0].block_ids) == 1
    assert set(upd) == {"a", "b"} and kv.num_used_blocks == 3

    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and cached_new_blocks(out) == {"a": 0, "b": 0}

    out, upd = step(sched)
    assert cached_new_blocks(out) == {"a": 1, "b": 1}
    assert upd["a"].finished and a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 4
    assert not upd["b"].finished
    assert kv.num_used_blocks == 2 and kv.block_table("a") == []
    assert sched.schedule().finished_request_ids == {"a"}  # the runner hears of it once, next step


def test_token_budget_splits_prefill_and_serves_running_requests_first():
    """Budget 8 tokens a step, block_size 4, 15 usable blocks. a: prompt 3; b: prompt 20; c: prompt 2.

    step 1: a 3 + b 5 (chunk) = 8; c does not fit the budget. a samples, b does not (5 < 20). b: 2 blocks.
    step 2: a 1 + b 7 (12 of 20, 3 blocks) = 8; c still waits: running requests come first.
    step 3: a 1 + b 7 (19 of 20, 5 blocks) = 8.
    step 4: a 1 + b 1 (20 of 20: samples) + c 2 = 4.
    """
    sched, kv = make_scheduler(num_blocks=16, budget=8)
    a, b, c = req("a", 3, max_tokens=10), req("b", 20), req("c", 2)
    for r in (a, b, c):
        sched.add_request(r)

    expected = [
        {"a": 3, "b": 5},
        {"a": 1, "b": 7},
        {"a": 1, "b": 7},
        {"a": 1, "b": 1, "c": 2},
    ]
    b_blocks = [2, 3, 5, 5]
    for i, want in enumerate(expected):
        out, upd = step(sched)
        assert out.num_scheduled_tokens == want, f"step {i + 1}"
        assert out.total_num_scheduled_tokens <= 8
        assert len(kv.block_table("b")) == b_blocks[i]
        if i < 3:
            assert "b" not in upd and b.output_token_ids == [], "a partial chunk samples nothing"
            assert c.status == RequestStatus.WAITING
    assert b.output_token_ids == [TOKEN] and b.num_computed_tokens == 20
    assert a.num_output_tokens == 4 and c.num_output_tokens == 1


def test_max_num_seqs_caps_the_running_batch():
    """max_num_seqs 2, plenty of blocks. a (max_tokens 1) and b run; c waits until a finishes after step 1,
    then joins at step 2."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=2)
    a, b, c = req("a", 4, max_tokens=1), req("b", 4, max_tokens=3), req("c", 4, max_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)
    out, upd = step(sched)
    assert new_ids(out) == ["a", "b"] and sched.num_waiting == 1 and c.status == RequestStatus.WAITING
    assert upd["a"].finished and sched.num_running == 1
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"b": 1, "c": 4} and sched.num_running == 2


def test_preemption_takes_the_newest_and_returns_it_to_the_front():
    """block_size 4, 4 usable blocks. a, b: prompt 4 (1 block each), max_tokens 2; c: prompt 8 (2 blocks).

    step 1: all three prefill: 1 + 1 + 2 = 4 blocks, 0 free; each samples 1 token.
    d (prompt 4) arrives: waiting = [d].
    step 2: a needs a 2nd block (5 tokens), none is free: the newest running request, c, is preempted
    (2 blocks back, its 1 token kept, 0 computed) and goes to the front: waiting = [c, d]. a takes 1 block,
    b (5 tokens) takes the other. No one is admitted in a step that preempted. a and b reach max_tokens and
    free 2 + 2 = 4 blocks.
    step 3: c is recomputed from prompt + its 1 token (9 tokens, 3 blocks) before d (1 block): 4 blocks.
    """
    sched, kv = make_scheduler(num_blocks=5, policy="fcfs")
    a, b, c = req("a", 4, max_tokens=2), req("b", 4, max_tokens=2), req("c", 8, max_tokens=4)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, tokens={"c": 42})
    assert kv.num_free_blocks == 0
    d = req("d", 4)
    sched.add_request(d)

    out, upd = step(sched)
    assert out.preempted_request_ids == {"c"}
    assert out.num_scheduled_tokens == {"a": 1, "b": 1} and cached_new_blocks(out) == {"a": 1, "b": 1}
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert c.output_token_ids == [42] and kv.block_table("c") == []
    assert upd["a"].finished and upd["b"].finished and sched.num_preemptions == 1

    out, _ = step(sched)
    assert new_ids(out) == ["c", "d"]
    resumed = out.new_requests[0]
    assert resumed.token_ids == [*c.prompt_token_ids, 42] and resumed.num_computed_tokens == 0
    assert resumed.num_prompt_tokens == 8 and len(resumed.block_ids) == 3
    assert out.num_scheduled_tokens == {"c": 9, "d": 4}
    assert c.output_token_ids == [42, TOKEN] and kv.num_free_blocks == 0


def test_newest_request_preempts_itself_when_it_is_the_one_short_of_blocks():
    """block_size 4, 3 usable blocks. a: prompt 3 (1 block), max_tokens 3; b: prompt 8 (2 blocks).

    step 2: a fits its 4th token in its block; b needs a 3rd block, none is free, and b is the newest: it
    preempts itself and is not scheduled.
    step 3: a (5 tokens) takes one of b's 2 freed blocks; b (9 tokens, 3 blocks) does not fit the 1 left.
    b's blocks were freed tail first, so the one a took was b's 2nd; b's 1st stays in the prefix cache.
    step 4: a finished after step 3 and freed 2 blocks: b resumes from its cached 1st block (4 tokens)
    and recomputes the other 5, in 3 blocks.
    """
    sched, kv = make_scheduler(num_blocks=4, policy="fcfs")
    a, b = req("a", 3, max_tokens=3), req("b", 8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out, _ = step(sched)
    assert out.preempted_request_ids == {"b"} and out.num_scheduled_tokens == {"a": 1}
    assert list(sched.waiting) == [b]
    out, upd = step(sched)
    assert out.num_scheduled_tokens == {"a": 1} and upd["a"].finished and b.status == RequestStatus.PREEMPTED
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"b": 5} and len(kv.block_table("b")) == 3
    assert out.new_requests[0].num_computed_tokens == 4 and b.num_cached_tokens == 0  # a resume, not a query


@pytest.mark.parametrize(
    ("params", "max_tokens", "tokens", "n_out", "status", "stop_reason"),
    [
        ({}, 8, [5, EOS], 2, RequestStatus.FINISHED_STOPPED, None),
        ({"min_tokens": 3}, 8, [EOS, EOS, EOS], 3, RequestStatus.FINISHED_STOPPED, None),
        ({"ignore_eos": True}, 3, [EOS, EOS, EOS], 3, RequestStatus.FINISHED_LENGTH, None),
        ({"stop_token_ids": [9]}, 8, [5, 9], 2, RequestStatus.FINISHED_STOPPED, 9),
        ({"stop_token_ids": [9], "min_tokens": 2}, 8, [9, 9], 2, RequestStatus.FINISHED_STOPPED, 9),
        ({}, 2, [5, 5], 2, RequestStatus.FINISHED_LENGTH, None),
    ],
)
def test_stop_conditions(params, max_tokens, tokens, n_out, status, stop_reason):
    sched, kv = make_scheduler(num_blocks=10)
    r = req("r", 4, max_tokens=max_tokens, **params)
    sched.add_request(r)
    for tok in tokens:
        if r.is_finished:
            break
        step(sched, tokens={"r": tok})
    assert r.num_output_tokens == n_out and r.status == status and r.stop_reason == stop_reason
    assert kv.num_used_blocks == 0 and not sched.has_unfinished_requests()


def test_max_model_len_ends_a_request():
    """max_model_len 12, prompt 10: at most 2 tokens, whatever max_tokens says."""
    sched, kv = make_scheduler(num_blocks=10, max_model_len=12)
    r = req("r", 10, max_tokens=50)
    sched.add_request(r)
    step(sched)
    step(sched)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_tokens == 12 and kv.num_used_blocks == 0


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "preempted"])
def test_abort_in_each_state_frees_everything(state):
    """Budget 4, block_size 4, 3 usable blocks. ``victim`` has a 10-token prompt, prefilled 4 tokens a step.

    waiting: ``other`` holds the only seat (max_num_seqs 1). preempted: ``other`` (prompt 3) and the victim
    share the budget: step 1 other 3 + victim 1, step 2 other 1 + victim 3 (1 block each); step 3 other grows
    to a 2nd block (the last free one) and the victim, needing a 2nd for 7 tokens, preempts itself.
    """
    sched, kv = make_scheduler(num_blocks=4, budget=4, max_num_seqs=1 if state == "waiting" else 8)
    victim = req("victim", 10)
    if state == "waiting":
        sched.add_request(req("other", 4, max_tokens=20))
        step(sched)
        sched.add_request(victim)
        step(sched)
        assert victim.status == RequestStatus.WAITING and victim.num_computed_tokens == 0
    elif state == "preempted":
        sched.add_request(req("other", 3, max_tokens=20))
        sched.add_request(victim)
        for _ in range(3):
            out, _ = step(sched)
        assert out.preempted_request_ids == {"victim"} and victim.status == RequestStatus.PREEMPTED
        assert kv.num_used_blocks == 2 == len(kv.block_table("other"))
    else:
        sched.add_request(victim)
        step(sched)  # 4 of 10 prompt tokens
        assert 0 < victim.num_computed_tokens < victim.num_prompt_tokens
        if state == "decoding":
            step(sched)
            step(sched)  # 10 of 10: samples
            assert victim.num_output_tokens == 1
    assert sched.abort_request("victim") is victim
    assert victim.status == RequestStatus.FINISHED_ABORTED and victim.finish_reason == "abort"
    assert kv.block_table("victim") == [] and "victim" not in sched.requests
    assert victim not in sched.waiting and victim not in sched.running
    assert sched.schedule().finished_request_ids == {"victim"}
    assert sched.abort_request("victim") is None  # twice is harmless
    sched.abort_request("other")
    assert kv.num_used_blocks == 0 and not sched.has_unfinished_requests()
    kv.check_invariants()


def test_waiting_requests_are_admitted_by_priority():
    """max_num_seqs 1: after the running request finishes, the more important waiting request goes first."""
    sched, _ = make_scheduler(num_blocks=20, max_num_seqs=1)
    first = req("first", 4, max_tokens=1)
    low, high = req("low", 4), req("high", 4)
    high.priority = 5
    sched.add_request(first)
    step(sched)  # first runs alone and finishes
    sched.add_request(low)
    sched.add_request(high)
    out, _ = step(sched)
    assert new_ids(out) == ["high"]
    assert [r.request_id for r in sched.waiting] == ["low"]


# -- property: random add / step / abort / stop against fake outputs ------------------------------------


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals (with priorities, some sharing prompt prefixes), steps with random sampled tokens
    (EOS sometimes), aborts and stop-string finishes, under both policies, with and without prefix caching.

    After every rule: the KV invariants hold, a running request owns exactly ceil(computed / block_size)
    blocks and a waiting one none, the runner's view of every block table (rebuilt only from the
    scheduler's outputs) matches the manager's, and a step with work to do schedules something. At the end,
    once everything has finished or been aborted, every block is free.
    """

    MAX_MODEL_LEN = 16
    PREFIXES = ([3] * 12, [4] * 12)  # prompts drawn from these share blocks

    @initialize(
        block_size=st.sampled_from([2, 4]),
        spare_blocks=st.integers(0, 8),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 24),
        policy=st.sampled_from(["priority", "fcfs"]),
        gap=st.integers(1, 2),
        watermark=st.sampled_from([0.0, 0.1]),
        prefix_caching=st.booleans(),
    )
    def setup(self, block_size, spare_blocks, max_num_seqs, budget, policy, gap, watermark, prefix_caching):
        num_blocks = 1 + -(-self.MAX_MODEL_LEN // block_size) + spare_blocks  # one full sequence always fits
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        self.config = SchedulerConfig(max_num_seqs, budget, self.MAX_MODEL_LEN, policy, gap, watermark)
        self.sched = Scheduler(self.config, self.kv)
        self.runner_tables: dict[str, list[int]] = {}
        self.ids = 0
        self.idle_steps = 0

    @rule(
        prompt_len=st.integers(1, MAX_MODEL_LEN - 1),
        max_tokens=st.integers(1, 8),
        min_tokens=st.integers(0, 2),
        priority=st.integers(0, 3),
        shared=st.sampled_from([None, 0, 1]),
    )
    def add(self, prompt_len, max_tokens, min_tokens, priority, shared):
        rid = f"r{self.ids}"
        self.ids += 1
        max_tokens = max(min_tokens, max_tokens)
        prompt = None
        if shared is not None:
            prompt = (self.PREFIXES[shared] + [self.ids % 7 + 5] * self.MAX_MODEL_LEN)[:prompt_len]
        r = req(
            rid,
            prompt_len,
            max_tokens=min(max_tokens, self.MAX_MODEL_LEN - prompt_len),
            min_tokens=min_tokens,
            priority=priority,
            prompt=prompt,
        )
        self.sched.add_request(r)

    @rule(seed=st.integers(0, 2**16), eos_rate=st.sampled_from([0.0, 0.3]))
    def step(self, seed, eos_rate):
        self._step(random.Random(seed), eos_rate)

    def _step(self, rnd: random.Random, eos_rate: float) -> None:
        sched, kv = self.sched, self.kv
        had_work = sched.has_unfinished_requests()
        computed_before = {rid: r.num_computed_tokens for rid, r in sched.requests.items()}
        out = sched.schedule()

        # What a runner in another process would know, built only from the outputs.
        for rid in out.finished_request_ids | out.preempted_request_ids:
            self.runner_tables.pop(rid, None)
        for new in out.new_requests:
            assert new.request_id not in self.runner_tables
            # Only a prefix-cache hit starts a request past 0, in whole blocks, never at its last token.
            assert new.num_computed_tokens % kv.block_size == 0
            assert new.num_computed_tokens < len(new.token_ids)
            if not kv.enable_prefix_caching:
                assert new.num_computed_tokens == 0
            assert new.token_ids == sched.requests[new.request_id].all_token_ids
            self.runner_tables[new.request_id] = list(new.block_ids)
        for cached in out.cached_requests:
            self.runner_tables[cached.request_id].extend(cached.new_block_ids)
            assert cached.num_computed_tokens == computed_before[cached.request_id]

        scheduled = out.num_scheduled_tokens
        assert out.total_num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert set(scheduled) == {n.request_id for n in out.new_requests} | {
            c.request_id for c in out.cached_requests
        }
        assert not set(scheduled) & out.preempted_request_ids
        assert len(sched.running) <= self.config.max_num_seqs
        for rid, n in scheduled.items():
            r = sched.requests[rid]
            assert n >= 1 and r.num_computed_tokens + n <= r.num_tokens
            assert self.runner_tables[rid] == kv.block_table(rid)
            if self.config.policy == "fcfs":
                assert not out.preempted_request_ids or rid not in {x.request_id for x in out.new_requests}
            assert len(kv.block_table(rid)) == kv.blocks_for_tokens(r.num_computed_tokens + n)

        if out.preempted_request_ids:
            event("preempted")
        if any(x.num_computed_tokens > 0 for x in out.new_requests):
            event("prefix hit")
        if any(
            r.num_computed_tokens + n < r.num_tokens
            for r, n in ((sched.requests[i], n) for i, n in scheduled.items())
        ):
            event("partial prefill chunk")
        if had_work:
            progressed = bool(scheduled) or bool(out.preempted_request_ids)
            assert progressed, "a step with unfinished requests did nothing"
            self.idle_steps = 0 if scheduled else self.idle_steps + 1
            assert self.idle_steps <= 1, "two steps in a row scheduled nothing"

        tokens = {}
        for rid, n in scheduled.items():
            r = sched.requests[rid]
            if r.num_computed_tokens + n == r.num_tokens:
                tokens[rid] = EOS if rnd.random() < eos_rate else rnd.choice([5, 6, 7])
        assert fake_output(sched, out, tokens).sampled_token_ids.keys() == tokens.keys()
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids=tokens))

    def _live_ids(self) -> list[str]:
        return sorted(self.sched.requests)

    @precondition(lambda self: bool(self.sched.requests))
    @rule(pick=st.integers(0, 100))
    def abort(self, pick):
        ids = self._live_ids()
        rid = ids[pick % len(ids)]
        assert self.sched.abort_request(rid) is not None
        assert self.kv.block_table(rid) == []

    @precondition(lambda self: bool(self.sched.running))
    @rule(pick=st.integers(0, 100))
    def stop_string_found(self, pick):
        r = self.sched.running[pick % len(self.sched.running)]
        self.sched.finish_request(r.request_id, "STOP")
        assert r.status == RequestStatus.FINISHED_STOPPED and self.kv.block_table(r.request_id) == []

    @invariant()
    def ownership(self):
        if not hasattr(self, "sched"):
            return
        sched, kv = self.sched, self.kv
        kv.check_invariants()
        running, waiting = set(map(id, sched.running)), set(map(id, sched.waiting))
        assert not running & waiting
        assert running | waiting == set(map(id, sched.requests.values()))
        for r in sched.running:
            assert r.status == RequestStatus.RUNNING
            assert len(kv.block_table(r.request_id)) == kv.blocks_for_tokens(r.num_computed_tokens)
        for r in sched.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.num_computed_tokens == 0 and kv.block_table(r.request_id) == []
        in_use = {b for r in sched.running for b in kv.block_table(r.request_id)}
        assert kv.num_used_blocks == len(in_use)
        if not kv.enable_prefix_caching:
            assert kv.num_used_blocks == sum(len(kv.block_table(r.request_id)) for r in sched.running)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        rnd = random.Random(0)
        for _ in range(500):
            if not self.sched.has_unfinished_requests():
                break
            self._step(rnd, eos_rate=0.0)
            self.ownership()
        assert not self.sched.has_unfinished_requests(), "requests never finished"
        assert self.kv.num_used_blocks == 0 and self.kv.num_free_blocks == self.kv.num_usable_blocks
        assert self.sched.requests == {}


SchedulerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSchedulerMachine = SchedulerMachine.TestCase
