"""Events the KV cache publishes as blocks enter and leave the prefix cache.

A router that consumes them knows exactly which prefixes each worker holds
(see ``block_hash`` for how to compute the same hashes from a prompt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tokenmill.engine.block_hash import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """Consecutive full blocks of one prefix became reusable.

    ``parent_block_hash`` is the hash of the block before the first one, None
    when the first block starts the sequence.
    """

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    num_tokens: int  # tokens in these blocks (len(block_hashes) * block_size)
    block_size: int
    type: str = field(default="BlockStored", init=False)


@dataclass(frozen=True)
class BlockRemoved:
    """The blocks were evicted: their prefixes are no longer cached."""

    block_hashes: list[BlockHash]
    type: str = field(default="BlockRemoved", init=False)


@dataclass(frozen=True)
class AllCleared:
    """The whole prefix cache was dropped (``reset_prefix_cache``)."""

    type: str = field(default="AllCleared", init=False)


@dataclass(frozen=True)
class CachedBlocks:
    """Every block in the prefix cache when a subscriber joined: its first event, to start from."""

    block_hashes: list[BlockHash]
    type: str = field(default="CachedBlocks", init=False)


KVEvent = BlockStored | BlockRemoved | AllCleared | CachedBlocks


@dataclass(frozen=True)
class KVEventBatch:
    """The events of one engine step, in order."""

    timestamp: float  # time.time() when the step ended
    events: list[KVEvent]

    def to_dict(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "events": [asdict(e) for e in self.events]}
