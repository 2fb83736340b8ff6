"""Seeds of the n samples of a seeded request: sample 0 keeps the seed, the others are unrelated to any
other seed's samples, so requests at nearby seeds never share samples."""

from __future__ import annotations

import pytest

from tests.tiny_models import drain
from tokenmill.engine import SamplingParams
from tokenmill.engine.input_processor import _splitmix64, sample_seed

PROMPT = "The quick brown fox"


def test_splitmix64_matches_the_reference_outputs():
    """The first two outputs of splitmix64 started at 0 (Vigna's reference splitmix64.c): the mixing is
    the published one, so the seeds are the same on every platform and in any reimplementation."""
    gamma = 0x9E3779B97F4A7C15
    assert _splitmix64(gamma) == 0xE220A8397B1DCDAF
    assert _splitmix64(2 * gamma % 2**64) == 0x6E789E6AA1B965F4


def test_sample_zero_keeps_the_seed_and_the_others_are_pinned():
    """Pinned values: a change here changes what every seeded n > 1 request returns."""
    assert [sample_seed(5, i) for i in range(3)] == [5, 7687626429108956431, -8553247020208786036]
    assert sample_seed(-(2**63), 0) == -(2**63)


def test_nearby_seeds_share_no_sample_seed():
    """Seeds 0..199 (and their negatives) with n=128 each: 51,000 samples, every seed different. With
    ``seed + i``, seed 5's sample 1 was seed 6's sample 0."""
    seeds = [sample_seed(s, i) for s in range(-199, 200) for i in range(128)]
    assert len(set(seeds)) == len(seeds)
    assert all(-(2**63) <= s < 2**63 for s in seeds), "children stay in int64, as validated seeds are"


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), -1])
def test_int64_edges_give_int64_sample_seeds(seed):
    children = [sample_seed(seed, i) for i in range(8)]
    SamplingParams(seed=children[-1]).validate()
    assert len(set(children)) == 8


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=128)


def samples(engine, rid: str, seed: int, n: int) -> list[tuple[int, ...]]:
    params = SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=8, ignore_eos=True)
    engine.add_request(rid, PROMPT, params)
    return [tuple(c.token_ids) for c in drain(engine)[rid].outputs]


def test_requests_at_nearby_seeds_return_unrelated_samples(engine):
    """QA's repro: seed 5 n=3, seed 6 n=2, seed 7 n=1 shared samples; now only a request's own seed is
    reused, as sample 0, so n=1 results are what they were."""
    five, six, seven = samples(engine, "a", 5, 3), samples(engine, "b", 6, 2), samples(engine, "c", 7, 1)
    assert len(set(five + six + seven)) == 6
    assert samples(engine, "d", 5, 1) == five[:1]
    assert samples(engine, "e", 6, 2) == six, "the same seed and n give the same samples"
