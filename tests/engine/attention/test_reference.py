"""The reference backend against attention written out by hand, on a mixed batch: decodes of different
lengths, prefills that share a shape (batched into one call, contiguous or not) and prefills that don't."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine.attention.backend import AttentionBatch, AttentionSpec
from tokenmill.engine.attention.reference import ReferenceBackend

D, BS = 8, 4


def naive(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int, window: int | None):
    """q [n, H, D] at positions first_pos.., keys/values [seq, KVH, D]: causal (and windowed) attention;
    query head h reads KV head h // (H / KVH)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    q_pos = torch.arange(first_pos, first_pos + q.shape[0]).unsqueeze(1)
    k_pos = torch.arange(keys.shape[0]).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("H", "KVH"), [(4, 2), (4, 4), (6, 2)])  # GQA groups of 2, 1 (MHA) and 3
def test_mixed_batch_matches_naive_attention(window, H, KVH):
    torch.manual_seed(0)
    # (context already cached, tokens this step): 2 decodes, then prefills where (3, 5) appears twice,
    # separated by another shape, and (0, 4) twice in a row: both group kinds, both index kinds.
    shapes = [(6, 1), (9, 1), (5, 3), (5, 2), (5, 3), (0, 4), (0, 4), (2, 7)]
    spec = AttentionSpec(H, KVH, D, BS, torch.float32, torch.device("cpu"), sliding_window=window)
    backend = ReferenceBackend(spec)
    max_blocks = max(-(-(c + n) // BS) for c, n in shapes)
    (cache,) = backend.allocate_kv_cache(1, 1 + len(shapes) * max_blocks)
    tables = torch.zeros((len(shapes), max_blocks), dtype=torch.long)
    full_k, full_v, q_parts, slot_parts, qsl = [], [], [], [], [0]
    for i, (ctx, n) in enumerate(shapes):
        blocks = torch.arange(1 + i * max_blocks, 1 + (i + 1) * max_blocks)
        blocks = blocks[torch.randperm(max_blocks)]  # scattered blocks, as a real pool hands out
        tables[i] = blocks
        k, v = torch.randn(ctx + n, KVH, D), torch.randn(ctx + n, KVH, D)
        slots = blocks[torch.arange(ctx + n) // BS] * BS + torch.arange(ctx + n) % BS
        cache[0, slots[:ctx]], cache[1, slots[:ctx]] = k[:ctx], v[:ctx]  # the cached context
        full_k.append(k)
        full_v.append(v)
        q_parts.append(torch.randn(n, H, D))
        slot_parts.append(slots[ctx:])
        qsl.append(qsl[-1] + n)
    batch = AttentionBatch(
        num_decodes=2,
        query_start_loc=qsl,
        context_lens=[c for c, _ in shapes],
        seq_lens=[c + n for c, n in shapes],
        block_table=tables,
        slot_mapping=torch.cat(slot_parts),
    )
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes, strict=True)])
    out = backend.forward(torch.cat(q_parts), new_k, new_v, cache, backend.prepare(batch))
    for i, (ctx, _) in enumerate(shapes):
        want = naive(q_parts[i], full_k[i], full_v[i], ctx, window)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], want, atol=1e-5, rtol=1e-5, msg=f"request {i}")
