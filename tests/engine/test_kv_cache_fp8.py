"""``kv_cache_dtype="fp8"``: K and V in float8 e4m3 with a float32 scale per (slot, KV head).

The codes and scales round-trip within e4m3's half step; the backend attends over exactly the
dequantized values on every path (decode, prefill with and without cached context); the plan counts
the real bytes; and on the trained demo model the fp8 cache moves logits by under 1% and greedy
decode picks full precision's own tokens but for near ties, while a cache read with wrong scales
fails the same checks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmill.engine.attention.kv_cache as kv_cache
from tests.engine.attention.test_reference import naive, paged_step
from tests.engine.test_config import BASE
from tests.tiny_models import random_prompts
from tokenmill.engine import LLM, Engine, EngineConfig, SamplingParams
from tokenmill.engine.attention import AttentionSpec, Fp8KVCache, ReferenceBackend
from tokenmill.engine.attention.kv_cache import MAX_SCALE, dequantize_kv, quantize_kv
from tokenmill.engine.config import ModelConfig
from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.memory import kv_bytes_per_token, plan_kv_cache
from tokenmill.engine.scoring import prompt_logits

HALF_STEP = 2.0**-4  # e4m3 has 3 mantissa bits: rounding moves a normal value by at most 2^-4 of it
SUBNORMAL_HALF_STEP = 2.0**-10  # below 2^-6 the codes are 2^-9 apart (times the scale)

# -- codes and scales --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_e4m3_code_decodes_to_its_value(dtype):
    """The bit-moving decode against PyTorch's own cast, on all 254 finite codes (subnormals, both
    zeros, the extremes), at a scale of 1 and one that exercises the folded 2^120."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~codes.float().isnan()].view(-1, 1, 1)
    for scale in (1.0, 2.0**-20):
        scales = torch.full((codes.shape[0], 1), scale)
        want = (codes.float() * scale).to(dtype)
        assert torch.equal(dequantize_kv(codes, scales, dtype), want)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 24),
    st.integers(1, 4),
    st.sampled_from([8, 64, 128]),
    st.floats(1e-6, 1e4),
    st.integers(0, 2**31 - 1),
)
def test_round_trip_error_is_within_half_an_e4m3_step(tokens, kv_heads, head_dim, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, kv_heads, head_dim, generator=gen) * spread
    x[0, 0] = 0.0  # an all-zero row must not divide by zero
    codes, scales = quantize_kv(x)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (tokens, kv_heads)
    back = dequantize_kv(codes, scales, torch.float32)
    bound = HALF_STEP * x.abs() + SUBNORMAL_HALF_STEP * scales.unsqueeze(-1)
    assert torch.all((back - x).abs() <= bound * (1 + 1e-6))
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.all((back - x).abs() <= HALF_STEP * amax * (1 + 1e-6))
    assert torch.all(back[0, 0] == 0)
    # bf16 reads round the scale and the product: 2^-8 more, still far inside the half step.
    in_bf16 = dequantize_kv(codes, scales, torch.bfloat16).float()
    assert torch.all((in_bf16 - back).abs() <= 2.0**-7 * back.abs())


def test_rows_past_the_largest_scale_saturate_instead_of_overflowing():
    x = torch.tensor([[[1e9, -1e9, 3.0, 0.0]]])
    back = dequantize_kv(*quantize_kv(x), torch.bfloat16)
    assert torch.isfinite(back).all()
    assert back[0, 0, :2].tolist() == [448 * MAX_SCALE, -448 * MAX_SCALE]


@pytest.mark.parametrize(("H", "KVH"), [(4, 2), (6, 2)])
def test_the_backend_attends_over_exactly_the_dequantized_cache(H, KVH):
    """Decodes, prefills over cached context and fresh prefills, all reading the fp8 cache, against
    attention by hand over the round-tripped K/V (the context written by earlier steps)."""
    torch.manual_seed(0)
    D, BS = 8, 4
    shapes = [(6, 1), (9, 1), (5, 3), (5, 3), (0, 4), (2, 7)]  # (cached context, tokens this step)
    spec = AttentionSpec(H, KVH, D, BS, torch.float32, torch.device("cpu"), kv_cache_dtype="fp8")
    backend = ReferenceBackend(spec)
    step = paged_step(backend, shapes, num_decodes=2, key_growth=True)
    out = step.run(backend)
    queries, keys, values, qsl = step.queries, step.keys, step.values, step.qsl
    for i, (ctx, _) in enumerate(shapes):
        k8, v8 = (dequantize_kv(*quantize_kv(t), torch.float32) for t in (keys[i], values[i]))
        want = naive(queries[i], k8, v8, ctx, None)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], want, atol=1e-5, rtol=1e-5, msg=f"request {i}")
        # Full-precision K/V would not pass: the check sees the quantization.
        assert not torch.allclose(out[qsl[i] : qsl[i + 1]], naive(queries[i], keys[i], values[i], ctx, None))


# -- capacity ----------------------------------------------------------------------------------

LLAMA_8B = {**BASE, "dtype": "bfloat16"}  # Llama 3.1 8B


def test_the_plan_counts_codes_and_scales_and_nearly_doubles_the_tokens():
    """Llama 3.1 8B, 1 GiB, blocks of 16, max_model_len 2048 (128 blocks a sequence).
    bf16: 2 x 32 layers x 8 heads x 128 x 2 B = 131072 B a token, 2 MiB a block: 512 blocks,
    511 usable = 8176 tokens, 3 sequences. fp8: 2 x 32 x 8 x (128 x 1 B + 4 B of scale) = 67584 B
    a token, 1081344 B a block: 992 blocks, 991 usable = 15856 tokens (1.94x), 7 sequences."""
    cfg = ModelConfig.from_dict(LLAMA_8B)
    auto, fp8 = (
        plan_kv_cache(cfg, torch.bfloat16, torch.device("cpu"), 16, 2048, 1 << 30, 0, kv_dtype)
        for kv_dtype in ("auto", "fp8")
    )
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 131072 == cfg.kv_bytes_per_token
    assert kv_bytes_per_token(cfg, torch.bfloat16, "fp8") == 67584
    assert (auto.bytes_per_block, auto.num_blocks, auto.num_tokens) == (2097152, 512, 8176)
    assert (fp8.bytes_per_block, fp8.num_blocks, fp8.num_tokens) == (1081344, 992, 15856)
    assert (auto.max_full_length_sequences, fp8.max_full_length_sequences) == (3, 7)
    assert "in bfloat16 =" in auto.summary()
    assert "in float8_e4m3fn + float32 scales = 991 blocks" in fp8.summary()


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_the_allocated_cache_holds_exactly_the_planned_bytes(tiny_llama, make_engine, kv_dtype):
    engine = make_engine(tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype=kv_dtype)
    caches = engine.runner.kv_caches
    tensors = [t for c in caches for t in ((c.data, c.scales) if isinstance(c, Fp8KVCache) else (c,))]
    assert sum(t.nbytes for t in tensors) == engine.kv_plan.kv_bytes
    assert isinstance(caches[0], Fp8KVCache) == (kv_dtype == "fp8")


def test_llm_passes_the_kv_cache_dtype_through(tiny_llama):
    auto = LLM(str(tiny_llama), device="cpu", kv_cache_memory=1 << 20)
    fp8 = LLM(str(tiny_llama), device="cpu", kv_cache_memory=1 << 20, kv_cache_dtype="fp8")
    assert fp8.kv_plan.kv_dtype == "float8_e4m3fn + float32 scales" and auto.kv_plan.kv_dtype == "float32"
    # tiny llama: head_dim 16, fp32. 4 B x 16 = 64 B a head and token against 16 B + 4 B: 3.2x.
    assert fp8.kv_plan.num_tokens > 3 * auto.kv_plan.num_tokens


@pytest.mark.parametrize("bad", ["fp16", "FP8", "float8", None])
def test_a_bad_kv_cache_dtype_names_the_field_and_the_allowed_values(bad):
    with pytest.raises(InvalidRequestError, match="allowed auto, fp8") as e:
        EngineConfig(kv_cache_dtype=bad).validate()
    assert e.value.field == "kv_cache_dtype"


# -- accuracy on the trained demo model ---------------------------------------------------------

DEMO_TEXT = (
    "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. "
    "Arise, fair sun, and kill the envious moon, who is already sick and pale with grief."
)
DEMO_PROMPTS = [
    "ROMEO:",
    "JULIET: O Romeo, Romeo",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING LEAR:",
    "HAMLET: To be, or not to be",
    "MACBETH:",
]
# A greedy token fp8 picks must score within this much of full precision's best at its position:
# near ties only. Measured: fp8 0.03 at most; scales 10% off already reach 0.2.
NEAR_TIE = 0.1


def demo(kv_cache_dtype: str) -> Engine:
    """The demo model in float32, so the only difference between two engines is the cache."""
    return Engine(
        EngineConfig(device="cpu", dtype="float32", kv_cache_memory=1 << 24, kv_cache_dtype=kv_cache_dtype)
    )


@pytest.fixture(scope="module")
def demo_auto() -> Engine:
    return demo("auto")


def test_fp8_logits_stay_within_one_percent_of_the_full_precision_cache(demo_auto):
    """Scored in chunks of 16: every chunk after the first reads its context back from the cache.
    Measured: 0.7% of the logits' norm, max 0.46 against a spread (std over the vocabulary) of 2.5;
    scales 10% off give 4% and 0.97, a neighbouring head's scales 15% and 4.3."""
    fp8 = demo("fp8")
    ids = demo_auto.tokenizer.encode(DEMO_TEXT)
    want = prompt_logits(demo_auto, [ids], chunk_size=16)[0]
    got = prompt_logits(fp8, [ids], chunk_size=16)[0]
    assert ((got - want).norm() / want.norm()).item() < 0.02
    assert (got - want).abs().max().item() < 0.25 * want.std(-1).mean().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.95
    # Attending to fresh K/V computes what reading them back does: a prompt scores the same whole.
    torch.testing.assert_close(prompt_logits(fp8, [ids])[0], got, atol=1e-4, rtol=0)


def greedy_gaps(fp8: Engine, reference: Engine) -> torch.Tensor:
    """For each token fp8 greedy decode picked: reference's best logit at that position minus the
    reference's logit of the picked token (0 where they agree), teacher-forced on fp8's text."""
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = {}
    for i, prompt in enumerate(DEMO_PROMPTS):
        fp8.add_request(f"p{i}", prompt, params)
    while fp8.has_unfinished_requests():
        outs.update({o.request_id: o for o in fp8.step() if o.finished})
    gaps = []
    for out in outs.values():
        prompt, picked = list(out.prompt_token_ids), out.outputs[0].token_ids
        rows = prompt_logits(reference, [prompt + picked])[0][len(prompt) - 1 : -1]
        gaps.append(rows.max(-1).values - rows[torch.arange(len(picked)), torch.tensor(picked)])
    return torch.cat(gaps)


def assert_greedy_agrees(gaps: torch.Tensor) -> None:
    assert gaps.max().item() < NEAR_TIE
    assert (gaps == 0).float().mean().item() >= 0.95


def test_fp8_greedy_decode_picks_full_precision_tokens_but_for_near_ties(demo_auto):
    """Measured: 99.5% of 192 decoded tokens are the full-precision cache's own greedy pick; the others
    trail its best by at most 0.03."""
    assert_greedy_agrees(greedy_gaps(demo("fp8"), demo_auto))


BROKEN_READS = {
    "scales of the neighbouring KV head": lambda codes, scales, dtype: dequantize_kv(
        codes, scales.roll(1, dims=-1), dtype
    ),
    "scales 25% too large": lambda codes, scales, dtype: dequantize_kv(codes, scales * 1.25, dtype),
}


@pytest.mark.parametrize("name", BROKEN_READS)
def test_a_cache_read_with_wrong_scales_fails_the_same_checks(demo_auto, monkeypatch, name):
    monkeypatch.setattr(kv_cache, "dequantize_kv", BROKEN_READS[name])
    with pytest.raises(AssertionError):
        assert_greedy_agrees(greedy_gaps(demo("fp8"), demo_auto))


# -- everything that reuses or rebuilds the cache -------------------------------------------------


def run_greedy(engine: Engine, prompts: list[list[int]], max_tokens: int = 10) -> list[list[int]]:
    """Each prompt submitted one step after the previous, so later ones can hit earlier ones' blocks."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outs = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    return [outs[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]


def test_prefix_cache_hits_give_the_tokens_of_a_full_prefill(tiny_llama, make_engine):
    """Four prompts after one 40-token system prompt: with prefix caching the last three reuse its two
    full fp8 blocks (codes and scales as written) instead of recomputing them."""
    system = random_prompts([40], seed=1)[0]
    prompts = [system + tail for tail in random_prompts([3, 9, 14, 5], seed=2)]
    cached = make_engine(tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype="fp8")
    fresh = make_engine(
        tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype="fp8", enable_prefix_caching=False
    )
    assert run_greedy(cached, prompts) == run_greedy(fresh, prompts)
    assert cached.stats().prefix_cache_hits >= 3 * 32


def test_chunked_prefill_and_preemption_give_the_tokens_of_a_roomy_engine(tiny_llama, make_engine):
    """Chunks of at most 16 tokens and a pool of 7 blocks (112 tokens) for five requests of up to 60:
    the fp8 cache is written piecemeal, dropped on preemption and recomputed."""
    prompts = random_prompts([20, 33, 12, 41, 26], seed=3)
    roomy = make_engine(tiny_llama, kv_cache_memory=1 << 20, kv_cache_dtype="fp8", max_model_len=64)
    per_token = kv_bytes_per_token(ModelConfig.from_pretrained(tiny_llama), torch.float32, "fp8")
    tight = make_engine(
        tiny_llama,
        kv_cache_memory=8 * 16 * per_token,
        kv_cache_dtype="fp8",
        max_model_len=64,
        max_num_batched_tokens=16,
    )
    assert run_greedy(tight, prompts, max_tokens=16) == run_greedy(roomy, prompts, max_tokens=16)
    assert tight.stats().num_preemptions >= 1
