"""Sampler: logits in, tokens and logprobs out, with hand-made logits so every rule is checked exactly."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tokenmill.engine.sampler import Sampler, SamplingRow, row_seed
from tokenmill.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 1


def row(prompt=(), output=(), eos=frozenset({EOS}), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [*prompt, *output], len(prompt), eos)


def sample(logits, rows, seed: int = 0):
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if logits.dim() == 1:
        logits = logits.expand(len(rows), -1)
    return Sampler(CPU, seed)(logits, rows)


def greedy_pick(logits: list[float], **kwargs) -> int:
    tokens, _ = sample(logits, [row(**kwargs)])
    return tokens[0]


# -- randomness and seeds ---------------------------------------------------------------------------------


def test_seeded_row_reproduces_whatever_batch_it_lands_in():
    """The same (seed, output position) gives the same token alone, at another index in a batch of other rows,
    and under another sampler seed; different positions and different seeds give different draws."""
    vocab = 64
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0))
    alone, mixed = [], []
    for pos in range(20):
        target = row(output=[7] * pos, temperature=1.0, seed=1234)
        tokens, _ = sample(logits, [target], seed=0)
        alone.append(tokens[0])
        others = [row(output=[3] * (pos % 4), temperature=0.9, seed=s) for s in range(pos % 3)]
        others += [row(temperature=1.3), row()]  # an unseeded row and a greedy one
        cut = pos % len(others)
        batch = [*others[:cut], target, *others[cut:]]
        batch_logits = torch.randn(len(batch), vocab)
        batch_logits[batch.index(target)] = logits
        tokens, _ = Sampler(CPU, seed=pos + 99)(batch_logits, batch)
        mixed.append(tokens[batch.index(target)])
    assert alone == mixed
    assert len(set(alone)) > 3, "the draw must depend on the output position"
    other_seed = [sample(logits, [row(output=[7] * p, temperature=1.0, seed=4321)])[0][0] for p in range(20)]
    assert other_seed != alone


def test_every_int64_seed_has_its_own_generator_seed_and_non_negative_ones_keep_theirs():
    """Reduced mod 2**63 alone, -1 and 2**63 - 1 seeded the same generator (on CUDA, which keeps 64 bits)."""
    edges = [0, 1, 2**62, 2**63 - 1, -1, -2, -(2**62), -(2**63)]
    for position in (0, 1, 1000):
        seeds = {row_seed(s, position) for s in edges}
        assert len(seeds) == len(edges) and all(0 <= x < 2**64 for x in seeds)
        for s in edges[:4]:  # what non-negative seeds drew before, they still draw
            assert row_seed(s, position) == (s * 1_000_003 + position) % 2**63
    assert row_seed(-1, 0) != row_seed(2**63 - 1, 0)


def test_unseeded_rows_follow_the_engine_seed():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(1))
    rows = [row(temperature=1.0) for _ in range(8)]
    a = Sampler(CPU, seed=5)(logits, rows)[0]
    b = Sampler(CPU, seed=5)(logits, rows)[0]
    c = Sampler(CPU, seed=6)(logits, rows)[0]
    assert a == b and a != c


def test_temperature_zero_is_argmax_even_beside_random_rows():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    rows = [row(), row(temperature=2.0, seed=1), row(temperature=1e-7), row(temperature=1.0)]
    tokens, _ = Sampler(CPU)(logits, rows)
    argmax = logits.argmax(-1).tolist()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]


# -- support restrictions ---------------------------------------------------------------------------------

PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = [math.log(p) for p in PROBS]
N = 2000


@pytest.mark.parametrize(
    ("params", "support"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 0}, set(range(6))),
        ({"top_k": -1}, set(range(6))),
        # top-p keeps the smallest prefix whose mass reaches p: 0.4 + 0.25 = 0.65 < 0.75 <= 0.8.
        ({"top_p": 0.75}, {0, 1, 2}),
        ({"top_p": 0.3}, {0}),
        # min-p keeps tokens with p >= min_p * p_max: 0.5 * 0.4 = 0.2.
        ({"min_p": 0.5}, {0, 1}),
        ({"min_p": 0.25}, {0, 1, 2, 3}),
        ({"top_k": 3, "top_p": 0.5}, {0, 1}),
        ({"top_k": 4, "min_p": 0.5}, {0, 1}),
    ],
)
def test_support_is_restricted_as_specified(params, support):
    """2000 draws in one batch, beside 2000 unrestricted rows: exactly the allowed tokens come out."""
    rows = [row(temperature=1.0, **params) for _ in range(N)] + [row(temperature=1.0) for _ in range(N)]
    tokens, _ = sample(LOGITS, rows)
    assert set(tokens[:N]) == support
    assert set(tokens[N:]) == set(range(6)), "rows without limits in the same batch keep the full support"


@pytest.mark.parametrize(
    "params",
    [
        {"top_p": 1e-300},  # 0.0 in float32: "mass before < p" holds for no token, not even the first
        {"top_p": 1e-46},  # below float32's smallest subnormal
        {"top_p": 1e-300, "top_k": 1},
        {"top_p": 1e-300, "min_p": 1.0},
        {"min_p": 1.0},
        {"top_k": 1},
    ],
)
def test_the_most_likely_token_always_survives_the_restrictions(params):
    """The favourite is the last token, so a mask that keeps nothing (all probabilities 0: argmax is 0)
    cannot pass for a correct one. Unrestricted rows in the batch keep sampling."""
    logits = list(reversed(LOGITS))
    rows = [row(temperature=1.0, **params) for _ in range(200)] + [row(temperature=1.0) for _ in range(200)]
    tokens, _ = sample(logits, rows)
    assert set(tokens[:200]) == {5}
    assert len(set(tokens[200:])) > 1


def test_restricted_draws_follow_the_renormalised_distribution():
    """top_k 2 at temperature 1: token 0 with 0.4 / 0.65 = 0.615; at temperature 0.5 the probabilities are
    squared first: 0.16 / (0.16 + 0.0625) = 0.719. 4000 draws: standard error < 0.008."""
    for temperature, expected in ((1.0, 0.4 / 0.65), (0.5, 0.16 / 0.2225)):
        tokens, _ = sample(LOGITS, [row(temperature=temperature, top_k=2) for _ in range(4000)], seed=3)
        share = Counter(tokens)[0] / len(tokens)
        assert share == pytest.approx(expected, abs=0.035)


# -- penalties ---------------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    """Penalty 2 on a token seen in the prompt: 3.0 -> 1.5, -1.0 -> -2.0 (transformers' rule). Competitors
    just above and below the expected value pin it within 0.1; unseen tokens are untouched."""
    assert greedy_pick([3.0, 1.6, 0.0], prompt=[0], repetition_penalty=2.0) == 1
    assert greedy_pick([3.0, 1.4, 0.0], prompt=[0], repetition_penalty=2.0) == 0
    assert greedy_pick([-1.0, -1.9, -5.0], prompt=[0], repetition_penalty=2.0) == 1
    assert greedy_pick([-1.0, -2.1, -5.0], prompt=[0], repetition_penalty=2.0) == 0
    # Output tokens count too, and the penalty does nothing to tokens never seen.
    assert greedy_pick([3.0, 1.6, 0.0], output=[0], repetition_penalty=2.0) == 1
    assert greedy_pick([1.6, 3.0, 0.0], output=[0], repetition_penalty=2.0) == 1
    assert greedy_pick([3.0, 1.6, 0.0], prompt=[2], repetition_penalty=2.0) == 0


def test_presence_and_frequency_penalties_subtract_per_output_occurrence():
    """Token 0 generated twice, presence 0.5 and frequency 0.25: 3.0 - 0.5 - 2 * 0.25 = 2.0."""
    kw = {"output": [0, 0, 2], "presence_penalty": 0.5, "frequency_penalty": 0.25}
    assert greedy_pick([3.0, 2.05, -9.0], **kw) == 1
    assert greedy_pick([3.0, 1.95, -9.0], **kw) == 0
    # Presence alone: 3.0 - 0.5 = 2.5, however often the token appeared.
    assert greedy_pick([3.0, 2.55, -9.0], output=[0, 0, 0], presence_penalty=0.5) == 1
    assert greedy_pick([3.0, 2.45, -9.0], output=[0, 0, 0], presence_penalty=0.5) == 0
    # Negative values reward repetition.
    assert greedy_pick([2.0, 2.4, -9.0], output=[0], presence_penalty=-0.5) == 0
    # Prompt tokens are not penalised by presence / frequency (OpenAI semantics: generated text only).
    assert greedy_pick([3.0, 2.05, -9.0], prompt=[0, 0], presence_penalty=2.0, frequency_penalty=2.0) == 0


def test_penalties_apply_per_row():
    logits = [3.0, 2.0, 0.0]
    rows = [row(output=[0], presence_penalty=2.0), row(output=[0]), row(prompt=[0], repetition_penalty=4.0)]
    tokens, _ = sample(logits, rows)
    assert tokens == [1, 0, 1]


# -- min_tokens ---------------------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = [0.0, 5.0, 4.0, 3.0]  # EOS (1) is the favourite, then token 2
    assert greedy_pick(logits, output=[3, 3], min_tokens=3) == 2
    assert greedy_pick(logits, output=[3, 3, 3], min_tokens=3) == EOS
    # stop_token_ids are masked the same way, alongside EOS
    assert greedy_pick([0.0, 5.0, 6.0, 3.0], output=[3], min_tokens=2, stop_token_ids=[2]) == 3
    assert greedy_pick([0.0, 5.0, 6.0, 3.0], output=[3, 3], min_tokens=2, stop_token_ids=[2]) == 2
    # ignore_eos: EOS is an ordinary token, so nothing masks it
    assert greedy_pick(logits, output=[], min_tokens=3, ignore_eos=True) == EOS
    # every EOS id of the model is masked
    assert greedy_pick(logits, output=[], min_tokens=1, eos=frozenset({1, 2})) == 3
    # sampled rows too: EOS never comes out while masked, though it holds most of the mass
    tokens, _ = sample(logits, [row(output=[3], min_tokens=2, temperature=1.0) for _ in range(500)])
    assert EOS not in tokens


# -- logprobs ------------------------------------------------------------------------------------------------


def test_logprobs_are_those_of_the_raw_distribution_with_rank_and_top_n():
    """The penalty makes greedy pick token 2 (raw rank 2); the logprobs still describe the raw logits."""
    raw = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.5])
    ref = torch.log_softmax(raw, -1)
    rows = [
        row(prompt=[1], repetition_penalty=3.0, logprobs=3),
        row(logprobs=0),
        row(),
        row(logprobs=5),
    ]
    tokens, lps = sample(raw, rows)
    assert tokens == [2, 1, 1, 1]
    first = lps[0]
    assert first.token_id == 2 and first.rank == 2
    assert first.logprob == pytest.approx(float(ref[2]), abs=1e-6)
    assert list(first.top) == [1, 2, 0]
    assert list(first.top.values()) == pytest.approx(ref[[1, 2, 0]].tolist(), abs=1e-6)
    assert lps[1].rank == 1 and lps[1].top == {} and lps[1].logprob == pytest.approx(float(ref[1]), abs=1e-6)
    assert lps[2] is None
    assert len(lps[3].top) == 5 and list(lps[3].top) == ref.argsort(descending=True).tolist()


def test_sampled_token_rank_counts_strictly_better_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0])
    tokens, lps = sample(logits, [row(temperature=5.0, logprobs=1) for _ in range(400)])
    ref = torch.log_softmax(logits, -1)
    for tok, lp in zip(tokens, lps, strict=True):
        assert lp.rank == tok + 1  # logits are sorted descending by token id
        assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-6)
        assert lp.top == {0: pytest.approx(float(ref[0]), abs=1e-6)}
    assert len(set(tokens)) == 4
