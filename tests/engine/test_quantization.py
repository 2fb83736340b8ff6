"""Weight-only int8: round-trip error, the kernel against its reference, and greedy tokens that match an
engine running the dequantized weights exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import SamplingParams
from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.fp8 import fp8_linear, quantize_fp8
from tokenmill.engine.models.layers import Linear
from tokenmill.engine.models.quantized import Fp8Weights, Int4Weights, Int8Weights
from tokenmill.engine.quantization import (
    dequantize_int4,
    dequantize_int8,
    int4_group_size,
    int4_linear,
    int8_linear,
    model_int4_group,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
)
from tokenmill.engine.scoring import prompt_logits

PROMPTS = ["Hello there", "The quick brown fox", "a b c d e f g h i j k"]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 64), st.integers(1, 96), st.floats(1e-4, 1e3), st.integers(0, 2**31 - 1))
def test_round_trip_error_is_at_most_half_a_step_per_row(rows, cols, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * spread
    w[0] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    error = (dequantize_int8(q, scales, torch.float32) - w).abs()
    # Half a step, plus the float32 rounding of q * scale itself (a tie such as w / scale = 88.5,
    # rounded to 88, lands exactly half a step away before that rounding): two ulps of w.
    assert torch.all(error <= scales[:, None] / 2 * (1 + 1e-5) + w.abs() * 2**-22 + 1e-12)
    assert torch.all(dequantize_int8(q, scales, torch.float32)[0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (40, 48)])  # both paths
def test_int8_kernel_matches_the_dequantized_matmul(dtype, shape):
    torch.manual_seed(0)
    q, scales = quantize_int8(torch.randn(32, 48))
    x = torch.randn(*shape).to(dtype)
    bias = torch.randn(32).to(dtype)
    got = int8_linear(x, q, scales.to(dtype), bias)
    want = torch.nn.functional.linear(x.float(), dequantize_int8(q, scales, torch.float32), bias.float())
    assert got.shape == (*shape[:-1], 32) and got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def dequantized_reference(engine) -> None:
    """Put every int8 layer back to plain weights holding exactly the dequantized values."""
    for module in engine.model.modules():
        if isinstance(module, Linear) and isinstance(module.quantized, Int8Weights):
            q, scales = module.quantized.int8_weight()
            module.weight.data = dequantize_int8(q, scales.float(), torch.float32)
            module.quantized = None


def greedy(engine) -> list[list[int]]:
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0)
    outputs = {}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"p{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    return [outputs[f"p{i}"] for i in range(len(PROMPTS))]


def test_int8_greedy_tokens_match_the_dequantized_weight_reference_exactly(tiny_models, make_engine):
    for arch, folder in tiny_models.items():
        quantized = make_engine(folder, quantization="int8")
        reference = make_engine(folder, quantization="int8")
        dequantized_reference(reference)
        assert greedy(quantized) == greedy(reference), arch


def test_int8_quantizes_every_linear_and_the_lm_head_and_shrinks_the_weights(tiny_llama, make_engine):
    full = make_engine(tiny_llama)
    int8 = make_engine(tiny_llama, quantization="int8")
    layers = [m for m in int8.model.modules() if isinstance(m, Linear)]
    assert int8.model.lm_head in layers
    assert all(m.quantized is not None for m in layers)
    assert int8.kv_plan.weight_bytes < full.kv_plan.weight_bytes
    kept = [m.quantized for m in layers]
    linear_params = sum(k.int8_weight()[0].numel() for k in kept)
    stored = sum(k.qweight.numel() + k.scales.numel() * k.scales.element_size() for k in kept)
    # fp32 -> int8 for those weights: what is stored (with the native layout's padding) is all they take
    assert full.kv_plan.weight_bytes - int8.kv_plan.weight_bytes == 4 * linear_params - stored
    assert stored < 4 * linear_params / 3


@pytest.mark.parametrize(("method", "asked", "quantized"), [
    ("int8", False, False), ("int4", None, False), ("int4", True, True), ("fp8", None, False),
])  # fmt: skip
def test_the_lm_head_follows_the_method_unless_told(tiny_llama, make_engine, method, asked, quantized):
    engine = make_engine(tiny_llama, quantization=method, quantize_lm_head=asked)
    head = engine.model.lm_head
    assert (head.quantized is not None) == quantized
    others = [m for m in engine.model.modules() if isinstance(m, Linear) and m is not head]
    assert all(m.quantized is not None for m in others)


def test_a_tied_head_is_quantized_beside_the_embedding_the_lookup_keeps(tiny_models, make_engine):
    folder = tiny_models["qwen3"]
    plain = make_engine(folder)
    assert plain.model.lm_head is None  # tied: the logits read the embedding
    int8 = make_engine(folder, quantization="int8")
    assert isinstance(int8.model.lm_head.quantized, Int8Weights)
    assert torch.equal(int8.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    # The tied head's int8 rows are the embedding's, quantized.
    q, scales = int8.model.lm_head.quantized.int8_weight()
    want_q, want_scales = quantize_int8(plain.model.embed_tokens.weight.data)
    assert torch.equal(q, want_q) and torch.allclose(scales.float(), want_scales.float())


def test_a_quantized_head_without_a_quantized_model_is_refused_by_name(tiny_llama, make_engine):
    with pytest.raises(InvalidRequestError, match="quantize_lm_head=True is invalid: allowed false or None"):
        make_engine(tiny_llama, quantize_lm_head=True)


def test_an_unknown_method_names_the_field_and_the_allowed_values(tiny_llama, make_engine):
    with pytest.raises(InvalidRequestError, match="quantization='int3' is invalid: allowed int8"):
        make_engine(tiny_llama, quantization="int3")
    with pytest.raises(ValueError, match="allowed int8"):
        quantize_model(torch.nn.Linear(2, 2), "fp4")


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 24), st.sampled_from([32, 64, 128, 256]), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1)
)
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(rows, cols, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * spread
    group = int4_group_size(cols)
    q, scales, zeros = quantize_int4(w, group)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    error = (dequantize_int4(q, scales, zeros, group, torch.float32) - w).abs().reshape(rows, -1, group)
    assert torch.all(error <= scales[..., None] / 2 * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int4_kernel_matches_the_dequantized_matmul(dtype, rows):
    torch.manual_seed(1)
    q, scales, zeros = quantize_int4(torch.randn(64, 256), 128)
    packed, scales_zeros = pack_int4(q, scales, zeros, dtype)
    x = torch.randn(rows, 256).to(dtype)
    got = int4_linear(x, packed, scales_zeros, 128, None)
    want = x.float() @ dequantize_int4(q, scales, zeros, 128, torch.float32).T
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())


def test_int4_greedy_tokens_match_the_dequantized_weight_reference_exactly(tiny_models, make_engine):
    for arch, folder in tiny_models.items():
        quantized = make_engine(folder, quantization="int4")
        reference = make_engine(folder)
        head = getattr(reference.model, "lm_head", None)
        layers = [m for m in reference.model.modules() if isinstance(m, Linear) and m is not head]
        group = model_int4_group([m.weight.shape[1] for m in layers])
        for module in layers:
            if module.weight.shape[1] % group == 0:
                q, scales, zeros = quantize_int4(module.weight.data, group)
                module.weight.data = dequantize_int4(q, scales, zeros, group, module.weight.dtype)
        assert any(isinstance(m, Int4Weights) for m in quantized.model.modules()), arch
        assert greedy(quantized) == greedy(reference), arch


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 24), st.integers(1, 96), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_fp8_round_trip_keeps_three_mantissa_bits(rows, cols, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * spread
    q, scales = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scales[:, None]
    # e4m3: 1/16 relative below the max, and steps of 2^-9 x scale near zero (subnormals)
    bound = torch.maximum(w.abs() / 16, scales[:, None] * 2**-9) * (1 + 1e-5)
    assert torch.all((back - w).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_path_matches_the_reference_path(dtype):
    """The Hopper path's call (torch._scaled_mm, which also runs on CPU) against the float32 reference."""
    torch.manual_seed(2)
    q, scales = quantize_fp8(torch.randn(64, 128))
    x = torch.randn(3, 5, 128).to(dtype)
    kernel = fp8_linear(x, q, scales, None, use_kernel=True)
    reference = fp8_linear(x, q, scales, None, use_kernel=False)
    assert kernel.shape == reference.shape == (3, 5, 64)
    assert torch.allclose(
        kernel.float(), reference.float(), rtol=2e-2, atol=2e-2 * reference.abs().max().item()
    )


def test_fp8_logits_of_the_trained_demo_model_stay_close_to_full_precision():
    """On trained weights (random tiny models have no structure to keep) fp8 weights and activations
    move the logits about 1%; the bound leaves room for other CPUs' summation orders."""
    from tokenmill.engine import Engine, EngineConfig

    full = Engine(EngineConfig(device="cpu", dtype="float32"))
    fp8 = Engine(EngineConfig(device="cpu", dtype="float32", quantization="fp8"))
    assert any(isinstance(m, Fp8Weights) for m in fp8.model.modules())
    ids = full.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks? It is the east.")
    want, got = prompt_logits(full, [ids])[0], prompt_logits(fp8, [ids])[0]
    assert ((got - want).norm() / want.norm()).item() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
