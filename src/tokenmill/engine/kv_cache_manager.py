"""Paged KV cache bookkeeping: which fixed-size blocks each request owns.

Pure Python, no tensors: the runner owns the memory, this class only hands out
block ids. A request holding ``t`` tokens of KV owns ``ceil(t / block_size)``
blocks, listed in order in its block table, so token ``i`` lives in slot
``block_table[i // block_size] * block_size + i % block_size``.

Block 0 is the null block: it is never handed out, and the attention backends
point padding at it, so it must stay all zeros.

Invariants (checked by ``check_invariants`` in tests):
- every block but the null block is either free or owned by exactly one request;
- ``ref_cnt[b]`` equals the number of block tables that list ``b``.
"""

from __future__ import annotations

from collections import deque

from tokenmill.engine.request import Request

NULL_BLOCK = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: need the null block and at least one more")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._ref_cnt = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of KV after the computed ones.

        Returns the newly added block ids (possibly empty), or None, with nothing
        changed, when the pool has too few free blocks.
        """
        table = self._tables.setdefault(request.request_id, [])
        needed = self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens) - len(table)
        if needed <= 0:
            return []
        if needed > len(self._free):
            if not table:
                del self._tables[request.request_id]
            return None
        new_blocks = [self._free.popleft() for _ in range(needed)]
        for b in new_blocks:
            self._ref_cnt[b] += 1
        table.extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        """Return every block of the request to the pool (no-op if it holds none)."""
        table = self._tables.pop(request_id, [])
        # Free in reverse so the tail blocks, least likely to be shared later, go first.
        for b in reversed(table):
            self._ref_cnt[b] -= 1
            if self._ref_cnt[b] == 0:
                self._free.append(b)

    def check_invariants(self) -> None:
        owners = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                owners[b] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert NULL_BLOCK not in free and owners[NULL_BLOCK] == 0, "the null block was handed out"
        for b in range(1, self.num_blocks):
            assert owners[b] == self._ref_cnt[b], f"block {b}: ref_cnt {self._ref_cnt[b]}, owners {owners[b]}"
            assert (b in free) == (owners[b] == 0), f"block {b} is free and owned, or neither"
