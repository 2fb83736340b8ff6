"""Chained hashes of full KV blocks: the keys of the prefix cache and of KV events.

The hash of block ``i`` covers the hash of block ``i - 1``, the block's token
ids and, for the first block only, the request's extra keys (a tenant's
``cache_salt``). So one hash names a whole prefix, and two tenants with
different salts never share a block.

Hashes are 64-bit integers from SHA-256 over a fixed byte encoding: the same
tokens and salt give the same hash in every process and on every machine,
which is what lets a router outside the engine compute where a prefix lives.
A cache hit is still confirmed against the stored tokens and parent hash, so a
collision can cost a miss but never wrong output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

BlockHash = int
HASH_SCHEME = "sha256-64-chained"  # the name workers announce with their KV events

# The parent of a request's first block: a constant, so that a prefix of a
# single block still hashes differently from the same tokens deeper in a prompt.
ROOT_PARENT_HASH: BlockHash = int.from_bytes(hashlib.sha256(b"tokenmill-kv-root").digest()[:8], "big")


def hash_block(parent: BlockHash, token_ids: Sequence[int], extra_key: str | None = None) -> BlockHash:
    h = hashlib.sha256()
    h.update(parent.to_bytes(8, "big"))
    h.update(np.asarray(token_ids, dtype="<u4").tobytes())
    if extra_key:
        h.update(b"\x00salt\x00")
        h.update(extra_key.encode())
    return int.from_bytes(h.digest()[:8], "big")


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    cache_salt: str | None = None,
    parent: BlockHash = ROOT_PARENT_HASH,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from ``start_block`` on, chained from ``parent``
    (the hash of block ``start_block - 1``, or the root)."""
    hashes: list[BlockHash] = []
    end = len(token_ids) // block_size
    if start_block >= end:
        return hashes
    if start_block == 0:
        parent = hash_block(parent, token_ids[:block_size], cache_salt)
        hashes.append(parent)
        start_block = 1
    # The same bytes hash_block would feed SHA-256, encoded once for the whole run of blocks:
    # a router hashes every prompt it routes, and per-block encoding was half the time.
    data = np.asarray(token_ids[start_block * block_size : end * block_size], dtype="<u4").tobytes()
    width = 4 * block_size
    for offset in range(0, len(data), width):
        h = hashlib.sha256(parent.to_bytes(8, "big"))
        h.update(data[offset : offset + width])
        parent = int.from_bytes(h.digest()[:8], "big")
        hashes.append(parent)
    return hashes
