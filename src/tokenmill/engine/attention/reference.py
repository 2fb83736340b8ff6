"""Reference attention: PyTorch ``scaled_dot_product_attention`` over the paged cache.

Runs on CPU and GPU and is the oracle the faster backends are tested against.
The cache of a layer is ``[2, num_slots, kv_heads, head_dim]`` (slot = block *
block_size + offset), or float8 codes of that shape and their scales: kv_cache.py
stores and gathers for this backend. Decodes of similar context length are
batched into one SDPA call over their gathered context, padded with the null
slot and masked. Prefills of the same shape (query length and cached context:
many requests after one shared system prompt, or a burst of equal prompts) run
as one batched causal SDPA call, straight on the fresh K/V when they have no
cached context; per-call overhead, not arithmetic, dominates small prefills on CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.engine.attention.backend import AttentionBackend, AttentionBatch, AttentionSpec
from tokenmill.engine.attention.kv_cache import KVCache, make_kv_store


@dataclass
class PrefillGroup:
    """Prefills with the same query length and context length, attended in one SDPA call."""

    tokens: torch.Tensor | slice  # [n * q_len] rows of the flat batch, request by request
    n: int
    q_len: int
    slots: torch.Tensor | None  # [n * seq_len] cache slots of the whole contexts, None if no context
    mask: torch.Tensor | None  # [q_len, seq_len] bool, None for plain causal


@dataclass
class _DecodeBucket:
    """Decodes of similar context length, attended in one padded SDPA call."""

    start: int  # first request (= first token: one each) of the bucket
    end: int
    slots: torch.Tensor  # [n, max_len] cache slots, padding -> slot 0 (the null block)
    mask: torch.Tensor | None  # [n, 1, 1, max_len] bool; None when nothing is padded


@dataclass
class ReferenceMetadata:
    slot_mapping: torch.Tensor
    decodes: list[_DecodeBucket]
    prefills: list[PrefillGroup]


# A decode joins the current bucket while its context is at most this many times
# the bucket's shortest: padding waste stays under 2x, and a batch spanning
# 16 to 1024 tokens still makes only ~6 kernel calls per layer.
BUCKET_SPREAD = 2.0


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        # Chosen once: the step never asks which dtype the cache holds.
        self.store = make_kv_store(spec)

    def allocate_kv_cache(self, num_layers: int, num_blocks: int) -> list[KVCache]:
        return self.store.allocate(num_layers, num_blocks)

    def prepare(self, batch: AttentionBatch) -> ReferenceMetadata:
        nd = batch.num_decodes
        decodes = [self._decode_bucket(batch, lo, hi) for lo, hi in _buckets(batch.seq_lens[:nd])]
        return ReferenceMetadata(batch.slot_mapping, decodes, self.prefill_groups(batch))

    def prefill_groups(self, batch: AttentionBatch) -> list[PrefillGroup]:
        """The batch's prefills (requests past the decodes), grouped by shape for ``attend_prefills``."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(batch.num_decodes, batch.num_requests):
            q_len = batch.query_start_loc[i + 1] - batch.query_start_loc[i]
            groups.setdefault((q_len, batch.context_lens[i]), []).append(i)
        return [self._prefill_group(batch, q_len, ctx, members) for (q_len, ctx), members in groups.items()]

    def _prefill_group(
        self, batch: AttentionBatch, q_len: int, ctx_len: int, members: list[int]
    ) -> PrefillGroup:
        device = self.spec.device
        seq_len = ctx_len + q_len
        starts = [batch.query_start_loc[i] for i in members]
        tokens: torch.Tensor | slice
        if all(b - a == q_len for a, b in itertools.pairwise(starts)):
            tokens = slice(starts[0], starts[0] + len(members) * q_len)  # contiguous: a view, no copy
        else:
            rows = torch.tensor(starts).unsqueeze(1) + torch.arange(q_len)
            tokens = rows.view(-1).to(device)
        slots = mask = None
        if ctx_len > 0 or self.spec.sliding_window is not None:
            seqs = torch.full((len(members),), seq_len, device=device)
            slots = self._context_slots(batch.block_table[members], seqs, seq_len)[0].reshape(-1)
            q_pos = torch.arange(ctx_len, seq_len, device=device).unsqueeze(1)
            k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
            mask = (k_pos <= q_pos) & self._in_window(q_pos, k_pos)
        return PrefillGroup(tokens, len(members), q_len, slots, mask)

    def _decode_bucket(self, batch: AttentionBatch, lo: int, hi: int) -> _DecodeBucket:
        lens = batch.seq_lens[lo:hi]
        max_len = max(lens)  # from the host list: no device sync
        seq_lens = torch.tensor(lens, device=self.spec.device)
        slots, valid = self._context_slots(batch.block_table[lo:hi], seq_lens, max_len)
        mask: torch.Tensor | None = None
        if self.spec.sliding_window is not None:
            key_pos = torch.arange(max_len, device=self.spec.device)
            valid &= self._in_window((seq_lens - 1).unsqueeze(1), key_pos)
            mask = valid[:, None, None, :]
        elif min(lens) != max_len:
            mask = valid[:, None, None, :]
        return _DecodeBucket(lo, hi, slots, mask)

    def _context_slots(
        self, block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.spec.block_size
        pos = torch.arange(max_len, device=block_table.device)
        slots = block_table[:, pos // bs] * bs + pos % bs
        valid = pos.unsqueeze(0) < seq_lens.unsqueeze(1)
        return torch.where(valid, slots, 0), valid

    def _in_window(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        if self.spec.sliding_window is None:
            return torch.ones((), dtype=torch.bool, device=q_pos.device)
        return k_pos > q_pos - self.spec.sliding_window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: ReferenceMetadata,
    ) -> torch.Tensor:
        store = self.store
        # The runner may pad the token axis (see ModelRunner): only the first rows are real.
        n = meta.slot_mapping.shape[0]
        # K/V as reads of the cache see them (dequantized, for fp8): a prefill that attends
        # to its own fresh K/V computes what it would with them read back from the cache.
        k, v = store.write(kv_cache, meta.slot_mapping, k[:n], v[:n])
        out = torch.empty_like(q)
        out[n:] = 0
        scale = self.spec.scale
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        for d in meta.decodes:
            n, length = d.slots.shape
            flat = d.slots.view(-1)
            keys = store.gather(kv_cache, 0, flat).view(n, length, kv_heads, dim).transpose(1, 2)
            values = store.gather(kv_cache, 1, flat).view(n, length, kv_heads, dim).transpose(1, 2)
            # The query heads that share a KV head (consecutive, as enable_gqa pairs them) go
            # in as that head's query rows: one [group, D] x [D, L] product per KV head. In
            # bf16 on CPU this is 6x faster than enable_gqa with one query row per head.
            query = q[d.start : d.end].reshape(n, kv_heads, heads // kv_heads, dim)
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=d.mask, scale=scale)
            out[d.start : d.end] = o.reshape(n, heads, dim)
        self.attend_prefills(q, k, v, kv_cache, meta.prefills, out)
        return out

    def attend_prefills(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        groups: list[PrefillGroup],
        out: torch.Tensor,
    ) -> None:
        """Each group's rows of ``out``, from the step's q/k/v (the whole flat batch; k and v as
        the cache returns them, already stored) and the cached context."""
        store, scale = self.store, self.spec.scale
        heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
        for g in groups:
            query = q[g.tokens].view(g.n, g.q_len, heads, dim).transpose(1, 2)  # [n, H, q, D]
            if g.slots is None:
                kv_shape = (g.n, g.q_len, kv_heads, dim)
                keys, values = k[g.tokens].view(kv_shape), v[g.tokens].view(kv_shape)
                o = F.scaled_dot_product_attention(
                    query,
                    keys.transpose(1, 2),
                    values.transpose(1, 2),
                    is_causal=True,
                    scale=scale,
                    enable_gqa=True,
                )
            else:
                kv_shape = (g.n, -1, kv_heads, dim)
                keys = store.gather(kv_cache, 0, g.slots).view(kv_shape).transpose(1, 2)
                values = store.gather(kv_cache, 1, g.slots).view(kv_shape).transpose(1, 2)
                o = F.scaled_dot_product_attention(
                    query, keys, values, attn_mask=g.mask, scale=scale, enable_gqa=True
                )
            out[g.tokens] = o.transpose(1, 2).reshape(g.n * g.q_len, heads, dim)


def _buckets(seq_lens: list[int]) -> list[tuple[int, int]]:
    """Split decodes, sorted by context length (the runner orders them so), into
    contiguous ranges whose longest context is at most BUCKET_SPREAD x the shortest."""
    ranges: list[tuple[int, int]] = []
    lo = 0
    for i in range(1, len(seq_lens) + 1):
        if i == len(seq_lens) or seq_lens[i] > BUCKET_SPREAD * seq_lens[lo]:
            ranges.append((lo, i))
            lo = i
    return ranges
