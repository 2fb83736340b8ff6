"""The pool of physical KV blocks: free lists, reference counts and the prefix cache.

Pure Python, no tensors. A block is in exactly one of three states:

- in use: ``ref_cnt > 0``, listed in that many block tables;
- free and uncached: no hash, on ``_free_uncached``; handed out first;
- free and cached: holds a full block of a known prefix, on ``_free_cached``
  in least-recently-freed order. It can be revived by a cache hit, or evicted
  (its hash dropped) when the pool needs a block and no uncached one is left.

Every block that holds a hash is in ``_cached`` under that hash, and only one
block holds a given hash. Block 0 is the null block and is never handed out.

A hit must serve KV computed over exactly the requested prefix, even if two
prefixes' hashes collided. So besides its tokens and parent hash, a cached
block records which physical block its KV was computed after (``KVRef``: the
block id and that block's allocation generation, which changes whenever the
block is handed out again) and, for a first block, the cache salt. A lookup
walks the chain from the root and accepts a block only if it was computed
after the very block matched one position earlier.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from tokenmill.engine.block_hash import ROOT_PARENT_HASH, BlockHash
from tokenmill.engine.kv_events import AllCleared, BlockRemoved, BlockStored, KVEvent

NULL_BLOCK = 0

KVRef = tuple[int, int]  # (block id, allocation generation): one instance of a block's KV
ROOT_REF: KVRef = (NULL_BLOCK, 0)  # what a sequence's first block is computed after


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, record_events: bool = False):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need the null block and at least one more")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.record_events = record_events
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self._parent: list[BlockHash | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._after: list[KVRef | None] = [None] * num_blocks  # the KV this block's was computed after
        self._salt: list[str | None] = [None] * num_blocks  # first blocks only
        self._gen = [0] * num_blocks
        self._free_uncached: deque[int] = deque(range(1, num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        self.events: list[KVEvent] = []

    @property
    def num_free(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def cached_hashes(self) -> list[BlockHash]:
        """Hashes of every block holding a reusable prefix, in use or free."""
        return list(self._cached)

    def ref(self, block: int) -> KVRef:
        return (block, self._gen[block])

    def lookup(
        self,
        block_hash: BlockHash,
        parent: BlockHash,
        token_ids: Sequence[int],
        after: KVRef = ROOT_REF,
        salt: str | None = None,
    ) -> int | None:
        """The block caching this prefix block, or None.

        Confirmed against its tokens, its parent hash, the KV it was computed
        after (``after``: the block matched one position earlier, or the root)
        and, for a first block, the salt.
        """
        b = self._cached.get(block_hash)
        if b is None or not self._matches(b, parent, tuple(token_ids), after, salt):
            return None
        return b

    def _matches(
        self, b: int, parent: BlockHash, tokens: tuple[int, ...], after: KVRef, salt: str | None
    ) -> bool:
        if self._parent[b] != parent or self._tokens[b] != tokens or self._after[b] != after:
            return False
        return after != ROOT_REF or self._salt[b] == salt

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (the caller checked ``num_free``), evicting cached ones last."""
        blocks = []
        for _ in range(n):
            if self._free_uncached:
                b = self._free_uncached.popleft()
            else:
                b, _ = self._free_cached.popitem(last=False)
                self._evict(b)
            self._gen[b] += 1  # new KV will be written here: old references to it are void
            self.ref_cnt[b] = 1
            blocks.append(b)
        return blocks

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cache-hit blocks, reviving them if they were free."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self._free_cached[b]
            self.ref_cnt[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; the first ones given are evicted first."""
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is None:
                    self._free_uncached.append(b)
                else:
                    self._free_cached[b] = None

    def cache(
        self,
        blocks: Sequence[int],
        hashes: Sequence[BlockHash],
        parent: BlockHash,
        tokens: Sequence[int],
        after: KVRef,
        salt: str | None = None,
    ) -> KVRef | None:
        """Register consecutive full blocks of one sequence (``tokens`` are theirs, in order).

        ``after`` is the KV the first of them was computed after (``ROOT_REF`` for
        a sequence's first block, which then records ``salt``). Returns the
        reference the sequence's next block will be computed after, or None when
        the chain can no longer be registered: a block whose hash another block
        holds stays private, and the chain goes on through that copy only if it
        holds the same KV (same tokens, computed after the same block).
        """
        bs = self.block_size
        stored: list[BlockHash] = []
        first_parent = parent
        for i, (b, h) in enumerate(zip(blocks, hashes, strict=True)):
            block_tokens = tuple(tokens[i * bs : (i + 1) * bs])
            block_salt = salt if after == ROOT_REF else None
            copy = self._cached.get(h)
            if copy is not None:
                self._emit_stored(stored, first_parent)
                stored, first_parent = [], h
                if not self._matches(copy, parent, block_tokens, after, block_salt):
                    return None  # a collision: what follows cannot be named safely
                after = self.ref(copy)  # same KV: later blocks chain through the cached copy
            else:
                self.block_hash[b], self._parent[b], self._tokens[b] = h, parent, block_tokens
                self._after[b], self._salt[b] = after, block_salt
                self._cached[h] = b
                stored.append(h)
                after = self.ref(b)
            parent = h
        self._emit_stored(stored, first_parent)
        return after

    def reset(self) -> None:
        """Forget every cached prefix. Blocks in use keep their KV but can no longer be hit."""
        for b in self._cached.values():
            self._forget(b)
        self._cached.clear()
        self._free_uncached.extend(self._free_cached)
        self._free_cached.clear()
        if self.record_events:
            self.events.append(AllCleared())

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        assert h is not None
        del self._cached[h]
        self._forget(b)
        if self.record_events:
            last = self.events[-1] if self.events else None
            if isinstance(last, BlockRemoved):
                last.block_hashes.append(h)
            else:
                self.events.append(BlockRemoved([h]))

    def _forget(self, b: int) -> None:
        self.block_hash[b] = self._parent[b] = self._tokens[b] = self._after[b] = self._salt[b] = None

    def _emit_stored(self, hashes: list[BlockHash], parent: BlockHash) -> None:
        if self.record_events and hashes:
            self.events.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=None if parent == ROOT_PARENT_HASH else parent,
                    num_tokens=len(hashes) * self.block_size,
                    block_size=self.block_size,
                )
            )

    def check_invariants(self) -> None:
        free_unc, free_c = set(self._free_uncached), set(self._free_cached)
        assert len(free_unc) == len(self._free_uncached), "a block is on the free list twice"
        assert not free_unc & free_c, "a block is on both free lists"
        assert NULL_BLOCK not in free_unc | free_c and self.ref_cnt[NULL_BLOCK] == 0, "null block handed out"
        for h, b in self._cached.items():
            assert self.block_hash[b] == h, f"block {b} is cached under {h} but holds {self.block_hash[b]}"
        for b in range(1, self.num_blocks):
            free = b in free_unc or b in free_c
            assert self.ref_cnt[b] >= 0, f"block {b}: negative ref_cnt"
            assert free == (self.ref_cnt[b] == 0), f"block {b}: ref_cnt {self.ref_cnt[b]}, free {free}"
            if b in free_unc:
                assert self.block_hash[b] is None, f"block {b} is cached but on the uncached free list"
            if b in free_c:
                assert self.block_hash[b] is not None, f"block {b} has no hash but is on the cached list"
            if self.block_hash[b] is not None:
                assert self._cached.get(self.block_hash[b]) == b, f"block {b}'s hash maps elsewhere"
