"""Scoring whole sequences: the model's logits at every position, for perplexity and parity checks.

This runs the engine's own model and attention backend on a private KV cache,
outside the scheduler (nothing else may step the engine meanwhile): the
sequences are prefilled together in one flat batch, as a prefill step would
run them, whole or in chunks. ``perplexity`` is the exponent of the mean negative log-likelihood of
each token given the ones before it.

Example::

    engine = Engine(EngineConfig())
    ids = engine.tokenizer.encode("To be, or not to be, that is the question")
    print(perplexity(engine, [ids]))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.attention import AttentionBatch, AttentionContext

if TYPE_CHECKING:
    from tokenmill.engine.engine import Engine


def prompt_logits(
    engine: Engine, sequences: Sequence[Sequence[int]], chunk_size: int | None = None
) -> list[torch.Tensor]:
    """For each sequence, a ``[len, vocab]`` tensor in the model's dtype: the logits after each token.

    ``chunk_size`` feeds the sequences that many tokens at a time, as chunked
    prefill does: every chunk after the first attends to the earlier ones' K/V
    read back from the cache, the path decode takes (and what a quantized KV
    cache changes). None: each sequence in one piece.
    """
    backend, bs = engine.runner.backend, engine.config.block_size
    blocks_each = [-(-len(s) // bs) for s in sequences]
    kv_caches = backend.allocate_kv_cache(engine.model_config.num_layers, 1 + sum(blocks_each))
    tables, next_block = [], 1  # block 0 is the null block
    for n in blocks_each:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    width = max(blocks_each)
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=engine.device)
    longest = max(len(s) for s in sequences)
    step = chunk_size or longest
    pieces: list[list[torch.Tensor]] = [[] for _ in sequences]
    for start in range(0, longest, step):
        members = [i for i, s in enumerate(sequences) if len(s) > start]
        chunks = [sequences[i][start : start + step] for i in members]
        batch, positions = _chunk_step(block_table, members, chunks, start, bs)
        ctx = AttentionContext(backend, kv_caches, backend.prepare(batch))
        input_ids = torch.tensor([t for c in chunks for t in c], device=engine.device)
        with torch.inference_mode():
            logits = engine.model.compute_logits(engine.model(input_ids, positions, ctx))
        for i, (a, b) in zip(members, itertools.pairwise(batch.query_start_loc), strict=True):
            pieces[i].append(logits[a:b])
    return [p[0] if len(p) == 1 else torch.cat(p) for p in pieces]


def _chunk_step(
    block_table: torch.Tensor, members: list[int], chunks: list[Sequence[int]], start: int, block_size: int
) -> tuple[AttentionBatch, torch.Tensor]:
    """One prefill step of ``chunks`` (sequence ``members[j]``'s tokens from position ``start``),
    and the tokens' positions."""
    table = block_table[members]
    positions = torch.cat([torch.arange(start, start + len(c)) for c in chunks]).to(table.device)
    owner = torch.cat([torch.full((len(c),), j) for j, c in enumerate(chunks)]).to(table.device)
    batch = AttentionBatch(
        num_decodes=0,
        query_start_loc=list(itertools.accumulate((len(c) for c in chunks), initial=0)),
        context_lens=[start] * len(chunks),
        seq_lens=[start + len(c) for c in chunks],
        block_table=table,
        slot_mapping=table[owner, positions // block_size] * block_size + positions % block_size,
    )
    return batch, positions


def perplexity(
    engine: Engine,
    sequences: Sequence[Sequence[int]],
    max_tokens_per_batch: int = 4096,
    chunk_size: int | None = None,
) -> float:
    """exp(mean negative log-likelihood) over every token after each sequence's first
    (``chunk_size``: see ``prompt_logits``)."""
    nll, count = 0.0, 0
    batch: list[Sequence[int]] = []
    for seq in [*sequences, None]:
        if seq is not None and (not batch or sum(map(len, batch)) + len(seq) <= max_tokens_per_batch):
            batch.append(seq)
            continue
        for ids, logits in zip(batch, prompt_logits(engine, batch, chunk_size), strict=True):
            target = torch.tensor(ids[1:], device=logits.device)
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            nll -= logprobs.gather(1, target[:, None]).sum().item()
            count += len(ids) - 1
        batch = [seq] if seq is not None else []
    if count == 0:
        raise ValueError("sequences: at least one needs two tokens or more")
    return math.exp(nll / count)
