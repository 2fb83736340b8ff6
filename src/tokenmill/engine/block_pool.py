"""The pool of physical KV blocks: free lists, reference counts and the prefix cache.

Pure Python, no tensors. A block is in exactly one of three states:

- in use: ``ref_cnt > 0``, listed in that many block tables;
- free and uncached: no hash, on ``_free_uncached``; handed out first;
- free and cached: holds a full block of a known prefix, on ``_free_cached``
  in least-recently-freed order. It can be revived by a cache hit, or evicted
  (its hash dropped) when the pool needs a block and no uncached one is left.

Every block that holds a hash is in ``_cached`` under that hash, and only one
block holds a given hash. Block 0 is the null block and is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from tokenmill.engine.block_hash import ROOT_PARENT_HASH, BlockHash
from tokenmill.engine.kv_events import AllCleared, BlockRemoved, BlockStored, KVEvent

NULL_BLOCK = 0


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

    def lookup(self, block_hash: BlockHash, parent: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The block caching this prefix block, confirmed against its tokens and parent; else None."""
        b = self._cached.get(block_hash)
        if b is None or self._parent[b] != parent or self._tokens[b] != tuple(token_ids):
            return None
        return b

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (the caller checked ``num_free``), evicting cached ones last."""
        blocks = []
        for _ in range(n):
            if self._free_uncached:
                b = self._free_uncached.popleft()
            else:
                b, _ = self._free_cached.popitem(last=False)
                self._evict(b)
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
        self, blocks: Sequence[int], hashes: Sequence[BlockHash], parent: BlockHash, tokens: Sequence[int]
    ) -> None:
        """Register consecutive full blocks of one sequence (``tokens`` are theirs, in order).

        A block whose hash another block already holds stays private: the first
        copy keeps serving hits.
        """
        bs = self.block_size
        stored: list[BlockHash] = []
        first_parent = parent
        for i, (b, h) in enumerate(zip(blocks, hashes, strict=True)):
            if h in self._cached:
                self._emit_stored(stored, first_parent)
                stored, first_parent = [], h
            else:
                self.block_hash[b], self._parent[b] = h, parent
                self._tokens[b] = tuple(tokens[i * bs : (i + 1) * bs])
                self._cached[h] = b
                stored.append(h)
            parent = h
        self._emit_stored(stored, first_parent)

    def reset(self) -> None:
        """Forget every cached prefix. Blocks in use keep their KV but can no longer be hit."""
        for b in self._cached.values():
            self.block_hash[b] = self._parent[b] = self._tokens[b] = None
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
        self.block_hash[b] = self._parent[b] = self._tokens[b] = None
        if self.record_events:
            last = self.events[-1] if self.events else None
            if isinstance(last, BlockRemoved):
                last.block_hashes.append(h)
            else:
                self.events.append(BlockRemoved([h]))

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
