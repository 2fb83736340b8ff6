"""KVCacheManager: block arithmetic, and no block leaked or double-owned under any sequence of operations."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from tokenmill.engine.kv_cache_manager import NULL_BLOCK, KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams


def request(rid: str, num_computed: int = 0) -> Request:
    r = Request(rid, prompt_token_ids=[5] * 8, sampling_params=SamplingParams())
    r.num_computed_tokens = num_computed
    return r


def test_allocation_rounds_up_to_whole_blocks():
    """block_size 4, 5 blocks: block 0 is the null block, 1..4 are usable.

    6 tokens need ceil(6/4) = 2 blocks -> [1, 2]; 2 more (8 tokens) still fit in 2 blocks -> [];
    1 more (9 tokens) needs a 3rd -> [3]; 8 more (17 tokens) would need 5 > 4 usable -> None, nothing changes.
    """
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.num_usable_blocks == 4 and kv.num_free_blocks == 4
    r = request("a")
    assert kv.allocate_slots(r, 6) == [1, 2]
    r.num_computed_tokens = 6
    assert kv.allocate_slots(r, 2) == []
    r.num_computed_tokens = 8
    assert kv.allocate_slots(r, 1) == [3]
    r.num_computed_tokens = 9
    assert kv.allocate_slots(r, 8) is None
    assert kv.block_table("a") == [1, 2, 3]
    assert kv.num_used_blocks == 3 and kv.usage == pytest.approx(0.75)
    kv.check_invariants()


def test_failed_first_allocation_leaves_no_trace():
    """4 usable blocks of 4 tokens: a 17-token prompt (5 blocks) cannot fit and must not keep a table."""
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.allocate_slots(request("big"), 17) is None
    assert kv.block_table("big") == [] and "big" not in kv._tables
    assert kv.num_free_blocks == 4
    kv.check_invariants()


def test_free_returns_every_block_and_is_idempotent():
    kv = KVCacheManager(num_blocks=9, block_size=4)
    a, b = request("a"), request("b")
    kv.allocate_slots(a, 9)  # 3 blocks
    kv.allocate_slots(b, 4)  # 1 block
    assert kv.num_used_blocks == 4
    kv.free("a")
    kv.free("a")
    kv.free("never-seen")
    assert kv.num_used_blocks == 1 and kv.block_table("a") == []
    kv.check_invariants()
    # The freed blocks are handed out again.
    assert sorted(kv.allocate_slots(request("c"), 28)) == [1, 2, 3, 5, 6, 7, 8]
    assert kv.num_free_blocks == 0
    kv.check_invariants()


def test_null_block_is_never_handed_out():
    kv = KVCacheManager(num_blocks=3, block_size=8)
    blocks = kv.allocate_slots(request("a"), 16)
    assert blocks == [1, 2] and NULL_BLOCK not in blocks
    assert kv.allocate_slots(request("b"), 1) is None


def test_needs_the_null_block_and_one_more():
    with pytest.raises(ValueError, match="num_blocks=1"):
        KVCacheManager(num_blocks=1, block_size=16)


def test_check_invariants_detects_a_double_owned_block():
    """The invariant checker itself must be able to fail, or the property tests below prove nothing."""
    kv = KVCacheManager(num_blocks=5, block_size=4)
    kv.allocate_slots(request("a"), 4)
    kv._tables["b"] = list(kv._tables["a"])  # corrupt: block 1 owned twice, ref_cnt 1
    with pytest.raises(AssertionError):
        kv.check_invariants()


class KVCacheMachine(RuleBasedStateMachine):
    """Random add / grow / finish / abort / preempt against a model of what each request should own.

    The manager does not distinguish finish, abort and preempt (all free the request's blocks); a preempted
    request comes back later with zero computed tokens and allocates again from scratch.
    """

    BLOCK_SIZE = 4
    NUM_BLOCKS = 12

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(self.NUM_BLOCKS, self.BLOCK_SIZE)
        self.tokens: dict[str, int] = {}  # request id -> tokens it holds KV for
        self.preempted: set[str] = set()
        self.next_id = 0

    active = Bundle("active")

    def _alloc(self, rid: str, have: int, more: int) -> bool:
        free_before = self.kv.num_free_blocks
        table_before = list(self.kv.block_table(rid))
        got = self.kv.allocate_slots(request(rid, have), more)
        need = -(-(have + more) // self.BLOCK_SIZE) - len(table_before)
        if got is None:
            assert need > free_before
            assert self.kv.num_free_blocks == free_before and self.kv.block_table(rid) == table_before
            return False
        assert len(got) == max(need, 0)
        assert self.kv.block_table(rid) == table_before + got
        self.tokens[rid] = have + more
        return True

    @rule(target=active, n=st.integers(1, 40))
    def add(self, n):
        rid = f"r{self.next_id}"
        self.next_id += 1
        return rid if self._alloc(rid, 0, n) else multiple()

    @rule(rid=active, n=st.integers(1, 9))
    def grow(self, rid, n):
        if rid in self.tokens:
            self._alloc(rid, self.tokens[rid], n)

    @rule(rid=consumes(active))
    def finish_or_abort(self, rid):
        self.kv.free(rid)
        self.tokens.pop(rid, None)
        self.preempted.discard(rid)

    @rule(rid=active)
    def preempt(self, rid):
        self.kv.free(rid)
        if self.tokens.pop(rid, None) is not None:
            self.preempted.add(rid)

    @rule(rid=active, n=st.integers(1, 40))
    def resume(self, rid, n):
        if rid in self.preempted and self._alloc(rid, 0, n):
            self.preempted.discard(rid)

    @invariant()
    def blocks_match_the_model(self):
        self.kv.check_invariants()
        for rid, t in self.tokens.items():
            assert len(self.kv.block_table(rid)) == -(-t // self.BLOCK_SIZE)
        assert self.kv.num_used_blocks == sum(len(self.kv.block_table(r)) for r in self.tokens)

    def teardown(self):
        for rid in list(self.tokens):
            self.kv.free(rid)
        assert self.kv.num_free_blocks == self.kv.num_usable_blocks
        self.kv.check_invariants()


KVCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestKVCacheMachine = KVCacheMachine.TestCase
