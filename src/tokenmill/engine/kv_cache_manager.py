"""Paged KV cache bookkeeping: which blocks each request owns, and prefix reuse.

Pure Python, no tensors: the runner owns the memory, this class only hands out
block ids. A request holding ``t`` tokens of KV owns ``ceil(t / block_size)``
blocks, listed in order in its block table, so token ``i`` lives in slot
``block_table[i // block_size] * block_size + i % block_size``.

With prefix caching, a request's full blocks are registered under their chained
hash (``block_hash``) as soon as they are scheduled to be computed; a new
request starts from the longest run of cached blocks that matches its tokens
(at most all but its last token: the last one must be computed to sample),
sharing them by reference count. Freed blocks stay cached until the pool needs
them, least recently freed first.

The scheduler may register blocks before the step that computes them runs, so
another request in the same step can hit them: every attention backend writes
a step's new K/V into the cache before any attention of that step reads it.

Invariants (``check_invariants``, exercised by a Hypothesis state machine):
- ``ref_cnt[b]`` equals the number of block tables that list ``b``;
- a block is free exactly when no table lists it; the null block is never listed;
- every cached hash maps to the one block that holds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.engine.block_hash import ROOT_PARENT_HASH, BlockHash, hash_blocks
from tokenmill.engine.block_pool import NULL_BLOCK, ROOT_REF, BlockPool, KVRef
from tokenmill.engine.kv_events import KVEvent
from tokenmill.engine.request import Request

__all__ = ["NULL_BLOCK", "KVCacheManager", "PrefixCacheStats"]


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache on admission, and how many were found."""

    requests: int = 0
    queries: int = 0  # tokens
    hits: int = 0  # tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        record_events: bool = False,
    ):
        self.pool = BlockPool(num_blocks, block_size, record_events)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_stats = PrefixCacheStats()
        self._tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks of the table already cached
        # The KV the request's next block to register is computed after; None once the
        # chain cannot be registered any more (see BlockPool.cache).
        self._chain: dict[str, KVRef | None] = {}

    # -- capacity -----------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, counting cached ones that are not in use."""
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.pool.num_free

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """The request's full-block hashes, extended as its tokens grow (kept on the request)."""
        hashes = request.block_hashes
        if len(hashes) < request.num_tokens // self.block_size:
            parent = hashes[-1] if hashes else ROOT_PARENT_HASH
            hashes.extend(
                hash_blocks(request.all_token_ids, self.block_size, request.cache_salt, parent, len(hashes))
            )
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request, leaving its last token out.

        No side effect: pass the result to ``allocate_slots`` to take them.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self.block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        tokens = request.all_token_ids
        bs = self.block_size
        blocks: list[int] = []
        parent, after = ROOT_PARENT_HASH, ROOT_REF
        for i in range(max_blocks):
            b = self.pool.lookup(hashes[i], parent, tokens[i * bs : (i + 1) * bs], after, request.cache_salt)
            if b is None:
                break
            blocks.append(b)
            parent, after = hashes[i], self.pool.ref(b)
        return blocks

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_stats.requests += 1
        self.prefix_stats.queries += num_tokens
        self.prefix_stats.hits += num_hit_tokens

    def reset_prefix_cache(self) -> None:
        self.pool.reset()
        for rid in self._tables:
            self._chain[rid] = None  # blocks already in tables stay private, and what follows them

    def cached_block_hashes(self) -> list[BlockHash]:
        return self.pool.cached_hashes()

    def take_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    # -- allocation ---------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> int:
        """Free blocks left after ``allocate_slots`` would succeed, or -1 if it would fail."""
        table = self._tables.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        needed = max(
            0, self.blocks_for_tokens(num_computed + num_new_tokens) - len(table) - len(cached_blocks)
        )
        revived = sum(1 for b in cached_blocks if self.pool.ref_cnt[b] == 0)
        left = self.pool.num_free - needed - revived
        return left if left >= 0 else -1

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` tokens after the computed ones.

        ``cached_blocks`` (only for a request that holds no blocks yet) are prefix
        hits from ``find_cached_prefix``: they are shared, and the caller advances
        ``num_computed_tokens`` past them. Returns the block ids appended to the
        table (hits included), or None, with nothing changed, when too few are free.
        """
        if self.can_allocate(request, num_new_tokens, cached_blocks) < 0:
            return None
        rid = request.request_id
        if rid not in self._tables:
            self._tables[rid] = []
            self._chain[rid] = self.pool.ref(cached_blocks[-1]) if cached_blocks else ROOT_REF
            self._num_registered[rid] = len(cached_blocks)
        table = self._tables[rid]
        assert not cached_blocks or len(table) == 0, "prefix hits are only taken on admission"
        self.pool.touch(cached_blocks)
        table.extend(cached_blocks)
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        needed = self.blocks_for_tokens(num_computed + num_new_tokens) - len(table)
        new_blocks = self.pool.allocate(max(0, needed))
        table.extend(new_blocks)
        return list(cached_blocks) + new_blocks

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's full blocks among its first ``num_tokens`` tokens."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self._tables.get(rid)
        after = self._chain.get(rid)
        if table is None or after is None:
            return
        start = self._num_registered[rid]
        end = min(num_tokens // self.block_size, len(table))
        if end <= start:
            return
        hashes = self.block_hashes(request)
        bs = self.block_size
        parent = hashes[start - 1] if start else ROOT_PARENT_HASH
        tokens = request.all_token_ids[start * bs : end * bs]
        self._chain[rid] = self.pool.cache(
            table[start:end], hashes[start:end], parent, tokens, after, request.cache_salt
        )
        self._num_registered[rid] = end

    def free(self, request_id: str) -> None:
        """Return every block of the request to the pool (no-op if it holds none)."""
        table = self._tables.pop(request_id, [])
        self._num_registered.pop(request_id, None)
        self._chain.pop(request_id, None)
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        self.pool.free(table[::-1])

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        owners = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                owners[b] += 1
        assert owners[NULL_BLOCK] == 0, "the null block was handed out"
        for b in range(1, self.num_blocks):
            assert owners[b] == self.pool.ref_cnt[b], (
                f"block {b}: ref_cnt {self.pool.ref_cnt[b]}, owners {owners[b]}"
            )
        for rid, table in self._tables.items():
            assert len(set(table)) == len(table), f"{rid} lists a block twice"
