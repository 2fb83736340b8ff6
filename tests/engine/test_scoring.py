"""Perplexity from the engine's own forward equals the one computed from transformers' logits."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny_models import hf_logits, random_prompts
from tokenmill.engine.scoring import perplexity


def test_perplexity_matches_transformers_and_batches_do_not_change_it(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    sequences = random_prompts((9, 30, 47), seed=5)
    nll, count = 0.0, 0
    for seq in sequences:
        logprobs = torch.log_softmax(hf_logits(tiny_llama, seq)[:-1].float(), dim=-1)
        nll -= logprobs.gather(1, torch.tensor(seq[1:])[:, None]).sum().item()
        count += len(seq) - 1
    want = math.exp(nll / count)
    assert perplexity(engine, sequences) == pytest.approx(want, rel=1e-4)
    assert perplexity(engine, sequences, max_tokens_per_batch=40) == pytest.approx(want, rel=1e-4)
    # Chunks of 7: sequences drop out as they end, and later chunks read their context from the cache.
    assert perplexity(engine, sequences, chunk_size=7) == pytest.approx(want, rel=1e-4)


def test_perplexity_needs_a_token_to_predict(tiny_llama, make_engine):
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(make_engine(tiny_llama), [[5]])
