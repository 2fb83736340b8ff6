"""Chained block hashes: the keys of the prefix cache, and what a router recomputes from a prompt."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import block_hash, hash_blocks
from tokenmill.engine.block_hash import ROOT_PARENT_HASH, hash_block

BS = 4
TOKENS = list(range(100, 114))  # 14 tokens: 3 full blocks of 4 and 2 left over


def reference_hash(parent: int, token_ids: list[int], salt: str | None) -> int:
    """The documented encoding, written out with nothing but hashlib and struct, as a router would."""
    data = parent.to_bytes(8, "big") + struct.pack(f"<{len(token_ids)}I", *token_ids)
    if salt:
        data += b"\x00salt\x00" + salt.encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def test_hashes_follow_the_documented_encoding():
    root = int.from_bytes(hashlib.sha256(b"tokenmill-kv-root").digest()[:8], "big")
    assert root == ROOT_PARENT_HASH
    parent, want = root, []
    for b in range(3):
        parent = reference_hash(parent, TOKENS[b * BS : (b + 1) * BS], "tenant-a" if b == 0 else None)
        want.append(parent)
    assert hash_blocks(TOKENS, BS, "tenant-a") == want
    assert all(0 <= h < 2**64 for h in want)


def test_hashes_are_deterministic_and_equal_in_another_process():
    """Python's own hash() differs across processes (PYTHONHASHSEED); these must not."""
    here = [hash_blocks(TOKENS, BS), hash_blocks(TOKENS, BS, "salt")]
    assert here == [hash_blocks(list(TOKENS), BS), hash_blocks(tuple(TOKENS), BS, "salt")]
    # Load the one module by path: importing the package would pull in torch and take seconds.
    code = (
        "import importlib.util, json, sys; "
        f"spec = importlib.util.spec_from_file_location('block_hash', {block_hash.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"t = {TOKENS!r}; print(json.dumps([m.hash_blocks(t, {BS}), m.hash_blocks(t, {BS}, 'salt')]))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(done.stdout) == here, f"PYTHONHASHSEED={seed}"


def test_changing_a_token_changes_its_block_and_every_later_one():
    """3 full blocks. A change in block 0 changes all 3 hashes; a change in block 1 keeps block 0's hash."""
    base = hash_blocks(TOKENS, BS)
    assert len(base) == 3 and len(set(base)) == 3
    in_block_0 = [*TOKENS[:2], 999, *TOKENS[3:]]
    assert all(a != b for a, b in zip(hash_blocks(in_block_0, BS), base, strict=True))
    in_block_1 = [*TOKENS[:5], 999, *TOKENS[6:]]
    h = hash_blocks(in_block_1, BS)
    assert h[0] == base[0] and h[1] != base[1] and h[2] != base[2]
    in_tail = [*TOKENS[:-1], 999]  # token 13 is in no full block
    assert hash_blocks(in_tail, BS) == base


def test_same_tokens_at_another_position_hash_differently():
    """A block's hash names its whole prefix: the same 4 tokens as block 0 and as block 1 differ."""
    h = hash_blocks([7] * 8, BS)
    assert h[0] != h[1]
    assert hash_blocks([7] * 4, BS) == h[:1]


def test_cache_salt_changes_every_hash_but_enters_only_through_the_first_block():
    plain, salted, other = hash_blocks(TOKENS, BS), hash_blocks(TOKENS, BS, "a"), hash_blocks(TOKENS, BS, "b")
    assert all(len({p, s, o}) == 3 for p, s, o in zip(plain, salted, other, strict=True))
    # Blocks after the first are chained from the salted first hash and take no salt themselves.
    assert salted[1:] == hash_blocks(TOKENS, BS, None, parent=salted[0], start_block=1)
    assert salted[1:] == hash_blocks(TOKENS, BS, "ignored past block 0", parent=salted[0], start_block=1)
    assert (
        salted[0]
        == hash_block(ROOT_PARENT_HASH, TOKENS[:BS], "a")
        != hash_block(ROOT_PARENT_HASH, TOKENS[:BS])
    )


def test_only_full_blocks_are_hashed():
    """len // block_size hashes: 3 tokens -> 0, 4 -> 1, 7 -> 1, 8 -> 2; what follows never changes them."""
    assert hash_blocks([], BS) == [] and hash_blocks(TOKENS[:3], BS) == []
    full = hash_blocks(TOKENS[:8], BS)
    assert len(hash_blocks(TOKENS[:4], BS)) == 1 and hash_blocks(TOKENS[:7], BS) == full[:1]
    assert len(full) == 2 and hash_blocks(TOKENS[:11], BS) == full


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    salt=st.sampled_from([None, "t1", "t2"]),
    data=st.data(),
)
def test_continuing_a_chain_equals_hashing_all_at_once(tokens, block_size, salt, data):
    whole = hash_blocks(tokens, block_size, salt)
    assert len(whole) == len(tokens) // block_size
    k = data.draw(st.integers(0, len(whole)), label="start_block")
    parent = whole[k - 1] if k else ROOT_PARENT_HASH
    assert hash_blocks(tokens, block_size, salt, parent=parent, start_block=k) == whole[k:]
    # As a request grows: hash what is known, then continue from the last hash on the longer list.
    cut = data.draw(st.integers(0, len(tokens)), label="known tokens")
    first = hash_blocks(tokens[:cut], block_size, salt)
    rest = hash_blocks(tokens, block_size, salt, first[-1] if first else ROOT_PARENT_HASH, len(first))
    assert first + rest == whole
