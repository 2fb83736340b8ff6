"""Scoring whole sequences: the model's logits at every position, for perplexity and parity checks.

This runs the engine's own model and attention backend on a private KV cache,
outside the scheduler (nothing else may step the engine meanwhile): the
sequences are prefilled together in one flat batch, as a prefill step would
run them. ``perplexity`` is the exponent of the mean negative log-likelihood of
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


def prompt_logits(engine: Engine, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """For each sequence, a ``[len, vocab]`` tensor in the model's dtype: the logits after each token."""
    backend, bs = engine.runner.backend, engine.config.block_size
    blocks_each = [-(-len(s) // bs) for s in sequences]
    kv_caches = backend.allocate_kv_cache(engine.model_config.num_layers, 1 + sum(blocks_each))
    tables, next_block = [], 1  # block 0 is the null block
    for n in blocks_each:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    width = max(blocks_each)
    device = engine.device
    block_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).to(device)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)]).to(device)
    slots = block_table[owner, positions // bs] * bs + positions % bs
    starts = [0]
    for s in sequences:
        starts.append(starts[-1] + len(s))
    batch = AttentionBatch(
        num_decodes=0,
        query_start_loc=starts,
        context_lens=[0] * len(sequences),
        seq_lens=[len(s) for s in sequences],
        block_table=block_table,
        slot_mapping=slots,
    )
    ctx = AttentionContext(backend, kv_caches, backend.prepare(batch))
    with torch.inference_mode():
        input_ids = torch.tensor([t for s in sequences for t in s], device=device)
        logits = engine.model.compute_logits(engine.model(input_ids, positions, ctx))
    return [logits[a:b] for a, b in itertools.pairwise(starts)]


def perplexity(engine: Engine, sequences: Sequence[Sequence[int]], max_tokens_per_batch: int = 4096) -> float:
    """exp(mean negative log-likelihood) over every token after each sequence's first."""
    nll, count = 0.0, 0
    batch: list[Sequence[int]] = []
    for seq in [*sequences, None]:
        if seq is not None and (not batch or sum(map(len, batch)) + len(seq) <= max_tokens_per_batch):
            batch.append(seq)
            continue
        for ids, logits in zip(batch, prompt_logits(engine, batch), strict=True):
            target = torch.tensor(ids[1:], device=logits.device)
            logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
            nll -= logprobs.gather(1, target[:, None]).sum().item()
            count += len(ids) - 1
        batch = [seq] if seq is not None else []
    if count == 0:
        raise ValueError("sequences: at least one needs two tokens or more")
    return math.exp(nll / count)
