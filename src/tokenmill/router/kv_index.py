"""Which worker holds which KV block, from the workers' own events (the ``kv`` policy).

Each tokenmill worker started with ``--kv-events`` streams what enters and
leaves its prefix cache (``GET /v1/kv_events``: a snapshot of every cached
block on connect, then ``BlockStored`` / ``BlockRemoved`` / ``AllCleared`` per
engine step). The index keeps, per block hash, the set of workers holding it,
so matching a prompt walks its block hashes once, whatever the fleet's size.

Events arrive only after a prefill has run, so a burst of requests with a new
prefix would otherwise all look uncached and scatter. The router therefore
also counts blocks it *expects* a worker to hold: a prompt's blocks count as
held where it was sent from the moment it is routed until its first byte
(when the worker's own events have caught up) or its end.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

_NOBODY: frozenset[str] = frozenset()


class KVIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> worker URLs whose cache has it
        self._blocks: dict[str, set[int]] = {}  # worker URL -> block hashes
        self._expected: dict[int, Counter[str]] = {}  # block hash -> worker URL -> requests due there
        self.block_sizes: dict[str, int] = {}  # worker URL -> tokens per block, from its config event

    # -- the workers' events ---------------------------------------------------------------------

    def apply(self, url: str, event: dict[str, Any]) -> None:
        """One event of a worker's ``/v1/kv_events`` stream (the dict inside ``events``)."""
        kind = event.get("type")
        if kind == "BlockStored":
            self._store(url, event["block_hashes"])
        elif kind == "BlockRemoved":
            self._remove(url, event["block_hashes"])
        elif kind == "AllCleared":
            self.forget(url, keep_block_size=True)
        elif kind == "CachedBlocks":  # the snapshot a fresh subscription starts from
            self.forget(url, keep_block_size=True)
            self._store(url, event["block_hashes"])

    def forget(self, url: str, keep_block_size: bool = False) -> None:
        """The worker's cache is unknown (its stream broke) or gone (it restarted or left)."""
        for h in self._blocks.pop(url, ()):
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(url)
                if not holders:
                    del self._holders[h]
        if not keep_block_size:
            self.block_sizes.pop(url, None)

    def _store(self, url: str, hashes: list[int]) -> None:
        mine = self._blocks.setdefault(url, set())
        for h in hashes:
            mine.add(h)
            self._holders.setdefault(h, set()).add(url)

    def _remove(self, url: str, hashes: list[int]) -> None:
        mine = self._blocks.get(url)
        if mine is None:
            return
        for h in hashes:
            mine.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(url)
                if not holders:
                    del self._holders[h]

    # -- the router's own expectations -----------------------------------------------------------

    def expect(self, url: str, hashes: list[int]) -> None:
        """A request with these blocks was just sent to ``url``."""
        for h in hashes:
            self._expected.setdefault(h, Counter())[url] += 1

    def settle(self, url: str, hashes: list[int]) -> None:
        """That request's prefill is done (or it ended): the worker's events speak for it now."""
        for h in hashes:
            due = self._expected.get(h)
            if due is None:
                continue
            due[url] -= 1
            if due[url] <= 0:
                del due[url]
                if not due:
                    del self._expected[h]

    # -- matching --------------------------------------------------------------------------------

    def matched_blocks(self, hashes: list[int], urls: list[str]) -> dict[str, int]:
        """Per worker, how many leading blocks of a prompt it holds or is about to."""
        matched = dict.fromkeys(urls, 0)
        active = set(urls)
        holders_of, expected_of = self._holders.get, self._expected.get
        for i, h in enumerate(hashes):
            holders = holders_of(h, _NOBODY)
            if active <= holders:  # the common case, checked in C
                continue
            due = expected_of(h)
            for url in [u for u in active if u not in holders and not (due and u in due)]:
                matched[url] = i
                active.discard(url)
            if not active:
                return matched
        for url in active:
            matched[url] = len(hashes)
        return matched

    def num_blocks(self, url: str) -> int:
        return len(self._blocks.get(url, ()))
