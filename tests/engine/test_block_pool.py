"""The prefix cache in the block pool: hits, sharing, eviction order, events, and a hit never serving
KV of another prefix or tenant, even when hashes collide."""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokenmill.engine import kv_cache_manager
from tokenmill.engine.block_hash import ROOT_PARENT_HASH, hash_block, hash_blocks
from tokenmill.engine.kv_cache_manager import NULL_BLOCK, KVCacheManager
from tokenmill.engine.kv_events import AllCleared, BlockRemoved, BlockStored
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams

# -- prefix caching -------------------------------------------------------------------------------------

BS = 4


def seq(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, prompt_token_ids=list(tokens), sampling_params=SamplingParams(), cache_salt=salt)


def compute(kv: KVCacheManager, r: Request, hits: list[int] = ()) -> list[int]:
    """Admit ``r`` as the scheduler does (take the hits, allocate the rest of its tokens, register its full
    blocks) and mark all its tokens computed. Returns its block table."""
    n = r.num_tokens - len(hits) * BS
    assert kv.allocate_slots(r, n, hits) is not None
    r.num_computed_tokens += len(hits) * BS
    kv.cache_blocks(r, r.num_computed_tokens + n)
    r.num_computed_tokens += n
    return kv.block_table(r.request_id)


A, B, C = [11] * BS, [12] * BS, [13] * BS  # three different full blocks


def test_find_cached_prefix_returns_the_longest_confirmed_run_but_never_the_last_tokens_block():
    """block_size 4, 9 usable blocks. ``a`` = A B (2 full blocks) registers both.

    Same 8 tokens: (8 - 1) // 4 = 1 block at most, since token 7 must be computed to sample -> [a0].
    A B + 1 token: (9 - 1) // 4 = 2 -> [a0, a1]. A C + 1: block 1 differs -> [a0]. C B + 1: block 0 differs,
    and block 1's hash is chained from it -> []. A + 1: (5 - 1) // 4 = 1 -> [a0]. A alone: 0 blocks.
    """
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a0, a1 = compute(kv, seq("a", A + B))
    assert kv.pool.num_cached == 2
    assert kv.find_cached_prefix(seq("q1", A + B)) == [a0]
    assert kv.find_cached_prefix(seq("q2", [*A, *B, 5])) == [a0, a1]
    assert kv.find_cached_prefix(seq("q3", [*A, *C, 5])) == [a0]
    assert kv.find_cached_prefix(seq("q4", [*C, *B, 5])) == []
    assert kv.find_cached_prefix(seq("q5", [*A, 5])) == [a0]
    assert kv.find_cached_prefix(seq("q6", A)) == []
    # No side effect: nothing taken, no stats recorded.
    assert kv.pool.ref_cnt[a0] == 1 and kv.num_used_blocks == 2 and kv.prefix_stats.queries == 0
    off = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    compute(off, seq("a", A + B))
    assert off.pool.num_cached == 0 and off.find_cached_prefix(seq("q2", [*A, *B, 5])) == []


def test_hits_share_blocks_in_use_and_revive_freed_ones():
    """block_size 4, 9 usable blocks. a = A B + 1 (3 blocks, 2 full ones registered).

    b = A B + 2 while a runs: hits a's 2 blocks (ref_cnt 2) and allocates 1 of its own: 4 blocks used.
    Both freed: 4 blocks free, the 2 full ones still cached. c = A B + 3 revives them (ref_cnt 0 -> 1),
    and can_allocate counts the revived ones: 9 free - 1 new - 2 revived = 6 left.
    """
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = seq("a", [*A, *B, 1])
    ta = compute(kv, a)
    b = seq("b", [*A, *B, 2])
    hits = kv.find_cached_prefix(b)
    assert hits == ta[:2]
    tb = compute(kv, b, hits)
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert [kv.pool.ref_cnt[x] for x in ta] == [2, 2, 1] and kv.num_used_blocks == 4
    kv.check_invariants()

    kv.free("a")
    kv.free("b")
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 9 and kv.pool.num_cached == 2
    c = seq("c", [*A, *B, 3])
    hits = kv.find_cached_prefix(c)
    assert hits == ta[:2] and kv.can_allocate(c, 1, hits) == 6
    compute(kv, c, hits)
    assert [kv.pool.ref_cnt[x] for x in hits] == [1, 1] and kv.num_used_blocks == 3
    kv.check_invariants()


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_freed():
    """block_size 4, 4 usable blocks. a = A (block 1), b = B (block 2), both registered; 3 and 4 never used.

    Freed in the order a, b, then a revived by a hit and freed again: cached free list = [b, a].
    A 2-block request gets the uncached 3 and 4, and both prefixes still hit; the next block evicts b's
    (least recently freed), the one after that a's.
    """
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    (blk_a,) = compute(kv, seq("a", A))
    (blk_b,) = compute(kv, seq("b", B))
    kv.free("a")
    kv.free("b")
    hits = kv.find_cached_prefix(seq("probe", [*A, 0]))
    assert hits == [blk_a]
    kv.allocate_slots(seq("revive", [*A, 0]), 1, hits)
    kv.free("revive")
    assert list(kv.pool._free_cached) == [blk_b, blk_a]

    assert sorted(kv.allocate_slots(seq("x", [0] * 8), 8)) == [3, 4]
    assert kv.find_cached_prefix(seq("pa", [*A, 0])) == [blk_a]
    assert kv.find_cached_prefix(seq("pb", [*B, 0])) == [blk_b]
    assert kv.allocate_slots(seq("y", [0] * 4), 4) == [blk_b]
    assert kv.find_cached_prefix(seq("pb", [*B, 0])) == [] and kv.pool.block_hash[blk_b] is None
    assert kv.find_cached_prefix(seq("pa", [*A, 0])) == [blk_a]
    assert kv.allocate_slots(seq("z", [0] * 4), 4) == [blk_a]
    assert kv.pool.num_cached == 0
    kv.check_invariants()


def test_a_requests_tail_block_is_evicted_before_its_head():
    """a = A B C (3 blocks, all registered), freed tail first: the head block, which more prompts share,
    is the last of the three to go."""
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    table = compute(kv, seq("a", A + B + C))
    kv.free("a")
    assert kv.allocate_slots(seq("x", [0] * 4), 4) == [table[2]]
    assert kv.find_cached_prefix(seq("p", [*A, *B, *C, 0])) == table[:2]
    assert kv.allocate_slots(seq("y", [0] * 4), 4) == [table[1]]
    assert kv.find_cached_prefix(seq("p", [*A, *B, *C, 0])) == table[:1]


def test_a_hash_collision_is_not_a_hit():
    """A block cached under the hash but holding other tokens (or another parent) is a miss, not wrong KV."""
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a0, a1 = compute(kv, seq("a", A + B))
    probe = seq("p", [*A, *B, 0])
    assert kv.find_cached_prefix(probe) == [a0, a1]
    kv.pool._tokens[a1] = tuple(C)  # as if C's chain hash equalled B's: hash found, tokens differ
    assert kv.find_cached_prefix(probe) == [a0]
    kv.pool._tokens[a0] = tuple(C)
    assert kv.find_cached_prefix(probe) == []

    pool = kv.pool
    pool.cache([5], [123], parent=456, tokens=A, after=(3, 1))
    assert pool.lookup(123, 456, A, after=(3, 1)) == 5
    assert pool.lookup(123, 789, A, after=(3, 1)) is None  # same hash and tokens, another parent
    assert pool.lookup(123, 456, B, after=(3, 1)) is None
    assert pool.lookup(123, 456, A, after=(3, 2)) is None  # computed after another instance of block 3
    assert pool.lookup(123, 456, A, after=(4, 1)) is None


def test_reset_prefix_cache_forgets_every_prefix_but_keeps_blocks_in_use():
    """block_size 4, 9 usable blocks. a = A B + 1 runs (3 blocks, 2 registered); b = C (1 block) freed.

    After the reset nothing hits, the free count is unchanged (9 - 3 = 6) and b's block is uncached.
    a's blocks stay private, the partial 3rd one too: when a grows to 12 tokens and fills it, nothing is
    registered and a's own tokens find no hit. Nor is its 4th block, allocated after the reset: its KV
    follows blocks no lookup can reach any more.
    """
    kv = KVCacheManager(num_blocks=10, block_size=BS, record_events=True)
    a = seq("a", [*A, *B, 1])
    compute(kv, a)
    (blk_c,) = compute(kv, seq("b", C))
    kv.free("b")
    kv.take_events()
    kv.reset_prefix_cache()
    assert kv.take_events() == [AllCleared()]
    assert kv.pool.num_cached == 0 and kv.num_free_blocks == 6 and kv.pool.block_hash[blk_c] is None
    assert kv.find_cached_prefix(seq("p", [*A, *B, 1, 0])) == []
    assert kv.find_cached_prefix(seq("q", [*C, 0])) == []
    kv.check_invariants()

    a.output_token_ids += [2, 3, 4]
    assert kv.allocate_slots(a, 3) == []
    kv.cache_blocks(a, 12)
    assert kv.pool.num_cached == 0 and kv.take_events() == []
    assert kv.find_cached_prefix(seq("p", [*A, *B, 1, 2, 3, 4, 0])) == []
    a.num_computed_tokens = 12
    a.output_token_ids += [5, 6, 7, 8]
    (a3,) = kv.allocate_slots(a, 4)
    kv.cache_blocks(a, 16)
    assert kv.pool.num_cached == 0 and kv.pool.block_hash[a3] is None
    kv.free("a")
    assert kv.num_free_blocks == 9
    kv.check_invariants()


def test_kv_events_for_stored_blocks_and_evictions():
    """block_size 4, 4 usable blocks, events on. a = A B + 2 tokens: its 2 full blocks are stored in one
    event with no parent; when a grows to 12 tokens, its 3rd block is stored with block 1's hash as parent.
    Freed (tail first: a2, a1, a0) and a 4-block request takes the uncached block, then evicts a2, a1, a0
    in that order: one BlockRemoved."""
    kv = KVCacheManager(num_blocks=5, block_size=BS, record_events=True)
    a = seq("a", [*A, *B, 1, 2])
    compute(kv, a)
    h = hash_blocks([*A, *B, 1, 2, 3, 4], BS)
    assert kv.take_events() == [BlockStored([h[0], h[1]], None, 8, BS)]
    assert kv.take_events() == []

    a.output_token_ids += [3, 4]
    kv.allocate_slots(a, 2)
    kv.cache_blocks(a, 12)
    assert kv.take_events() == [BlockStored([h[2]], h[1], 4, BS)]

    kv.free("a")
    assert kv.take_events() == []  # freeing keeps blocks cached: nothing removed yet
    kv.allocate_slots(seq("big", [0] * 16), 16)
    assert kv.take_events() == [BlockRemoved([h[2], h[1], h[0]])]


def test_salted_blocks_report_their_salted_hashes():
    kv = KVCacheManager(num_blocks=5, block_size=BS, record_events=True)
    compute(kv, seq("a", [*A, *B], salt="tenant"))
    (stored,) = kv.take_events()
    assert stored.block_hashes == hash_blocks([*A, *B], BS, "tenant") != hash_blocks([*A, *B], BS)
    assert kv.find_cached_prefix(seq("p", [*A, *B, 0])) == []
    assert len(kv.find_cached_prefix(seq("p", [*A, *B, 0], salt="tenant"))) == 2


def test_duplicate_registration_keeps_the_block_private_and_emits_nothing():
    """a = A B registers both blocks. b = A B hits only block 0 (its last token must be computed) and
    computes block 1 again in a block of its own: that hash is already cached, so b's copy stays private
    (no hash, no event), and freeing it returns it to the uncached list.

    c = A B C computed from scratch (no hits taken): blocks 0 and 1 are duplicates, block 2 is new and
    is stored alone, with block 1's hash as its parent.
    """
    kv = KVCacheManager(num_blocks=10, block_size=BS, record_events=True)
    a0, a1 = compute(kv, seq("a", A + B))
    h = hash_blocks(A + B + C, BS)
    assert kv.take_events() == [BlockStored(h[:2], None, 8, BS)]

    b = seq("b", A + B)
    hits = kv.find_cached_prefix(b)
    assert hits == [a0]
    _, b1 = compute(kv, b, hits)
    assert b1 != a1 and kv.pool.block_hash[b1] is None and kv.pool._cached[h[1]] == a1
    assert kv.take_events() == []
    kv.check_invariants()
    kv.free("b")
    assert b1 in kv.pool._free_uncached and kv.find_cached_prefix(seq("p", [*A, *B, 0])) == [a0, a1]

    c0, c1, c2 = compute(kv, seq("c", A + B + C))
    assert kv.pool.block_hash[c0] is None and kv.pool.block_hash[c1] is None
    assert kv.pool._cached[h[2]] == c2
    assert kv.take_events() == [BlockStored([h[2]], h[1], 4, BS)]
    kv.check_invariants()


def test_a_collision_in_a_parent_block_does_not_serve_wrong_kv(monkeypatch):
    """The module docstring promises a collision "can cost a miss but never wrong output". Make every
    first block hash alike (a collision), block_size 4:

    x = A + 1 registers A under h0. y = C (4 tokens: too short for a hit) computes C privately; its hash
    h0 is already taken, so y's block 0 stays private. y decodes B: were block 1 registered under
    h(h0, B), parent h0, z = A B + 1 would walk block 0 -> x's A (tokens confirmed), block 1 -> y's B
    (tokens and parent hash confirmed), whose KV was computed over C, not A: wrong output. So y's chain
    stops at the collision, and only x's block 0 is a hit.
    """
    real = kv_cache_manager.hash_blocks

    def first_blocks_collide(tokens, block_size, salt=None, parent=ROOT_PARENT_HASH, start_block=0):
        if start_block > 0:
            return real(tokens, block_size, salt, parent, start_block)
        return [1, *real(tokens, block_size, salt, 1, 1)] if len(tokens) >= block_size else []

    monkeypatch.setattr(kv_cache_manager, "hash_blocks", first_blocks_collide)
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    (x0, _) = compute(kv, seq("x", [*A, 1]))
    y = seq("y", C)
    assert kv.find_cached_prefix(y) == []
    (y0,) = compute(kv, y)
    y.output_token_ids += B
    kv.allocate_slots(y, 4)
    kv.cache_blocks(y, 8)
    y1 = kv.block_table("y")[1]
    assert kv.pool.block_hash[y0] is None and kv.pool.block_hash[y1] is None

    hits = kv.find_cached_prefix(seq("z", [*A, *B, 1]))
    assert hits[:1] == [x0]
    assert y1 not in hits, (
        "block 1's KV was computed after C, but it is served to a prompt that starts with A"
    )


def test_a_collision_across_salts_does_not_share_a_tenants_block(monkeypatch):
    """block_hash promises that two tenants with different salts never share a block. Make the salt drop
    out of the hash (a collision between salted and unsalted first blocks): the lookup confirms tokens and
    parent but not the salt, so tenant t1 is served the unsalted block."""
    real = kv_cache_manager.hash_blocks
    monkeypatch.setattr(
        kv_cache_manager,
        "hash_blocks",
        lambda tokens, block_size, salt=None, parent=ROOT_PARENT_HASH, start_block=0: real(
            tokens, block_size, None, parent, start_block
        ),
    )
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    compute(kv, seq("public", [*A, 1]))
    assert kv.find_cached_prefix(seq("t1", [*A, 1], salt="t1")) == []


# -- property: prefix caching never serves wrong KV -----------------------------------------------------


class PrefixCacheMachine(RuleBasedStateMachine):
    """Admit (prefix hits taken as the scheduler takes them), grow in chunks, decode, preempt and resume,
    finish, reset the cache, on prompts drawn from a few shared prefixes (two tenants) so that hits,
    duplicates and evictions all happen in a small pool.

    Besides the block accounting, the machine keeps what a runner would have written into each slot: the
    tokens up to and including that position (the KV of a token depends on all tokens before it) and the
    tenant's salt. Every hit must return blocks whose slots hold exactly the request's own prefix: a hit
    never serves wrong KV, and never another tenant's.
    """

    BLOCK_SIZE = BS
    NUM_BLOCKS = 10  # 9 usable
    MAX_LEN = 24
    # Different first blocks, shared later blocks: the shapes where a chain could go wrong.
    PREFIXES = (A + B + B + C, C + B + B + A, A + A + C + B, B + B + B + B)
    SALTS = (None, "t1")

    def __init__(self):
        super().__init__()
        self.kv = self.make_kv()
        self.running: dict[str, Request] = {}
        self.preempted: dict[str, Request] = {}
        self.tables: dict[str, list[int]] = {}
        self.slots: dict[int, list[tuple[tuple[int, ...], str | None] | None]] = {}
        self.next_id = 0

    def make_kv(self) -> KVCacheManager:
        return KVCacheManager(self.NUM_BLOCKS, self.BLOCK_SIZE)

    # -- what a scheduler and runner do --

    def _check_hits(self, r: Request, hits: list[int]) -> None:
        tokens, bs = r.all_token_ids, self.BLOCK_SIZE
        assert len(hits) <= (r.num_tokens - 1) // bs, "a hit covers the token that must be computed"
        for j, b in enumerate(hits):
            for o in range(bs):
                pos = j * bs + o
                written = self.slots.get(b, [None] * bs)[o]
                assert written is not None, f"hit block {b} slot {o} was never written"
                context, salt = written
                assert context == tuple(tokens[: pos + 1]), (
                    f"{r.request_id} hit block {b} (its block {j}), whose slot {o} holds KV of another prefix"
                )
                assert salt == r.cache_salt, f"{r.request_id} hit tenant {salt!r}'s block {b}"
        if hits:
            event("prefix hit")

    def _admit(self, r: Request, chunk: int) -> bool:
        kv, rid = self.kv, r.request_id
        assert r.num_computed_tokens == 0 and kv.block_table(rid) == []
        hits = kv.find_cached_prefix(r)
        self._check_hits(r, hits)
        num_hit = len(hits) * self.BLOCK_SIZE
        n = min(r.num_tokens - num_hit, chunk)
        free_before = kv.num_free_blocks
        got = kv.allocate_slots(r, n, hits)
        if got is None:
            assert kv.block_table(rid) == [] and kv.num_free_blocks == free_before
            event("admission refused")
            return False
        assert got[: len(hits)] == hits
        self.tables[rid] = list(got)
        self.running[rid] = r
        r.num_computed_tokens += num_hit
        self._compute(r, n)
        return True

    def _compute(self, r: Request, n: int, token: int = 12) -> None:
        """Register the blocks this step fills (as the scheduler does), write their slots (as the runner
        does), then advance; sample a token when the end is reached."""
        kv, bs, rid = self.kv, self.BLOCK_SIZE, r.request_id
        start = r.num_computed_tokens
        kv.cache_blocks(r, start + n)
        tokens, table = r.all_token_ids, self.tables[rid]
        for pos in range(start, start + n):
            b = table[pos // bs]
            assert kv.pool.ref_cnt[b] == 1, f"{rid} writes into block {b}, which another table shares"
            self.slots.setdefault(b, [None] * bs)[pos % bs] = (tuple(tokens[: pos + 1]), r.cache_salt)
        r.num_computed_tokens = start + n
        if r.num_computed_tokens == r.num_tokens:
            if r.num_tokens >= self.MAX_LEN:
                self._free(rid)
            else:
                r.output_token_ids.append(token)

    def _free(self, rid: str) -> None:
        self.kv.free(rid)
        self.tables.pop(rid, None)
        self.running.pop(rid, None)
        self.preempted.pop(rid, None)

    def _pick(self, requests: dict[str, Request], pick: int) -> Request:
        return requests[sorted(requests)[pick % len(requests)]]

    # -- rules --

    @rule(
        prefix=st.integers(0, len(PREFIXES) - 1),
        length=st.integers(1, 20),
        tail=st.sampled_from([11, 20, 21]),
        salt=st.sampled_from(SALTS),
        chunk=st.integers(1, 12),
    )
    def admit(self, prefix, length, tail, salt, chunk):
        rid = f"r{self.next_id}"
        self.next_id += 1
        prompt = (list(self.PREFIXES[prefix]) + [tail] * self.MAX_LEN)[:length]
        self._admit(seq(rid, prompt, salt), chunk)

    @precondition(lambda self: bool(self.running))
    @rule(pick=st.integers(0, 99), chunk=st.integers(1, 12), token=st.sampled_from([11, 12, 13, 20]))
    def grow(self, pick, chunk, token):
        r = self._pick(self.running, pick)
        kv, rid = self.kv, r.request_id
        n = min(chunk, r.num_tokens - r.num_computed_tokens)
        free_before, table_before = kv.num_free_blocks, list(kv.block_table(rid))
        got = kv.allocate_slots(r, n)
        if got is None:
            assert kv.num_free_blocks == free_before and kv.block_table(rid) == table_before
            return
        self.tables[rid].extend(got)
        self._compute(r, n, token)

    @precondition(lambda self: bool(self.running))
    @rule(pick=st.integers(0, 99))
    def finish(self, pick):
        self._free(self._pick(self.running, pick).request_id)

    @precondition(lambda self: bool(self.running))
    @rule(pick=st.integers(0, 99))
    def preempt(self, pick):
        r = self._pick(self.running, pick)
        self._free(r.request_id)
        r.num_computed_tokens = 0
        self.preempted[r.request_id] = r

    @precondition(lambda self: bool(self.preempted))
    @rule(pick=st.integers(0, 99), chunk=st.integers(1, 24))
    def resume(self, pick, chunk):
        r = self._pick(self.preempted, pick)
        # Out of the waiting set first: an admission that computes to the end frees the request.
        del self.preempted[r.request_id]
        if not self._admit(r, chunk):
            self.preempted[r.request_id] = r  # refused: still waiting

    @rule()
    def reset(self):
        self.kv.reset_prefix_cache()
        assert self.kv.pool.num_cached == 0

    # -- invariants --

    @invariant()
    def accounting(self):
        kv, pool = self.kv, self.kv.pool
        kv.check_invariants()
        owners: dict[int, int] = {}
        for rid, table in self.tables.items():
            assert kv.block_table(rid) == table
            for b in table:
                owners[b] = owners.get(b, 0) + 1
        for rid in self.preempted:
            assert kv.block_table(rid) == []
        for r in self.running.values():
            assert len(self.tables[r.request_id]) == kv.blocks_for_tokens(r.num_computed_tokens)
        free_uncached, free_cached = set(pool._free_uncached), set(pool._free_cached)
        for b in range(1, self.NUM_BLOCKS):
            assert pool.ref_cnt[b] == owners.get(b, 0), f"block {b}"
            states = (pool.ref_cnt[b] > 0, b in free_uncached, b in free_cached)
            assert sum(states) == 1, f"block {b} in use/uncached/cached: {states}"
        assert NULL_BLOCK not in owners
        assert kv.num_used_blocks == len(owners)

    @invariant()
    def every_hit_serves_the_right_kv(self):
        for i, prefix in enumerate(self.PREFIXES):
            for salt in self.SALTS:
                probe = seq(f"probe{i}", [*prefix, 20], salt)
                self._check_hits(probe, self.kv.find_cached_prefix(probe))

    def teardown(self):
        for rid in list(self.tables):
            self._free(rid)
        assert self.kv.num_used_blocks == 0 and self.kv.num_free_blocks == self.kv.num_usable_blocks
        self.kv.check_invariants()


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase


class CollidingKVCacheManager(KVCacheManager):
    """Block hashes cut to 2 bits: every few blocks collide, so only the confirmation stands between a
    lookup and wrong KV."""

    def block_hashes(self, request: Request) -> list[int]:
        hashes = request.block_hashes
        tokens, bs = request.all_token_ids, self.block_size
        while len(hashes) < request.num_tokens // bs:
            b = len(hashes)
            parent = hashes[-1] if hashes else ROOT_PARENT_HASH
            hashes.append(
                hash_block(parent, tokens[b * bs : (b + 1) * bs], request.cache_salt if b == 0 else None) % 4
            )
        return hashes


class CollidingPrefixCacheMachine(PrefixCacheMachine):
    def make_kv(self) -> KVCacheManager:
        return CollidingKVCacheManager(self.NUM_BLOCKS, self.BLOCK_SIZE)


CollidingPrefixCacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCollidingPrefixCacheMachine = CollidingPrefixCacheMachine.TestCase
