"""The reference backend against attention written out by hand, on a mixed batch: decodes of different
lengths, prefills that share a shape (batched into one call, contiguous or not) and prefills that don't."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class PagedStep:
    """One step's batch over a paged cache whose context earlier steps wrote, and each request's parts."""

    cache: object
    batch: AttentionBatch
    queries: list[torch.Tensor]
    keys: list[torch.Tensor]  # context and this step's tokens
    values: list[torch.Tensor]
    qsl: list[int]

    def run(self, backend: ReferenceBackend) -> torch.Tensor:
        shapes = list(zip(self.batch.context_lens, self.batch.seq_lens, strict=True))
        new_k = torch.cat([k[c:] for k, (c, _) in zip(self.keys, shapes, strict=True)])
        new_v = torch.cat([v[c:] for v, (c, _) in zip(self.values, shapes, strict=True)])
        return backend.forward(torch.cat(self.queries), new_k, new_v, self.cache, backend.prepare(self.batch))


def paged_step(
    backend: ReferenceBackend, shapes: list[tuple[int, int]], num_decodes: int, key_growth: bool = False
) -> PagedStep:
    """``shapes``: (context already cached, tokens this step) per request, decodes first. Blocks are
    scattered, as a real pool hands them out; the context goes in through the backend's own store.
    ``key_growth``: request i's keys are scaled by 1 + i (rows of different magnitudes)."""
    spec = backend.spec
    max_blocks = max(-(-(c + n) // BS) for c, n in shapes)
    (cache,) = backend.allocate_kv_cache(1, 1 + len(shapes) * max_blocks)
    tables = torch.zeros((len(shapes), max_blocks), dtype=torch.long)
    keys, values, queries, new_slots, qsl = [], [], [], [], [0]
    for i, (ctx, n) in enumerate(shapes):
        blocks = torch.arange(1 + i * max_blocks, 1 + (i + 1) * max_blocks)
        tables[i] = blocks[torch.randperm(max_blocks)]
        k = torch.randn(ctx + n, spec.num_kv_heads, D) * (1 + i if key_growth else 1)
        v = torch.randn(ctx + n, spec.num_kv_heads, D)
        slots = tables[i][torch.arange(ctx + n) // BS] * BS + torch.arange(ctx + n) % BS
        backend.store.write(cache, slots[:ctx], k[:ctx], v[:ctx])  # what earlier steps wrote
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(n, spec.num_heads, D))
        new_slots.append(slots[ctx:])
        qsl.append(qsl[-1] + n)
    batch = AttentionBatch(
        num_decodes=num_decodes,
        query_start_loc=qsl,
        context_lens=[c for c, _ in shapes],
        seq_lens=[c + n for c, n in shapes],
        block_table=tables,
        slot_mapping=torch.cat(new_slots),
    )
    return PagedStep(cache, batch, queries, keys, values, qsl)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize(("H", "KVH"), [(4, 2), (4, 4), (6, 2)])  # GQA groups of 2, 1 (MHA) and 3
def test_mixed_batch_matches_naive_attention(window, H, KVH):
    torch.manual_seed(0)
    # (context already cached, tokens this step): 2 decodes, then prefills where (3, 5) appears twice,
    # separated by another shape, and (0, 4) twice in a row: both group kinds, both index kinds.
    shapes = [(6, 1), (9, 1), (5, 3), (5, 2), (5, 3), (0, 4), (0, 4), (2, 7)]
    spec = AttentionSpec(H, KVH, D, BS, torch.float32, torch.device("cpu"), sliding_window=window)
    backend = ReferenceBackend(spec)
    step = paged_step(backend, shapes, num_decodes=2)
    out = step.run(backend)
    for i, (ctx, _) in enumerate(shapes):
        want = naive(step.queries[i], step.keys[i], step.values[i], ctx, window)
        torch.testing.assert_close(
            out[step.qsl[i] : step.qsl[i + 1]], want, atol=1e-5, rtol=1e-5, msg=f"request {i}"
        )
