"""tokenmill's C++ CPU kernels: built on this machine; the int8 matmul gives the dequantized weight's
products, the RMSNorm the rounding of its PyTorch form."""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import native
from tokenmill.engine.models.cpu_packing import packing_supported
from tokenmill.engine.models.layers import RMSNorm, apply_rotary
from tokenmill.engine.models.quantized import Int8Weights
from tokenmill.engine.native.builder import build, disabled_reason, isa
from tokenmill.engine.native.int8 import (
    NATIVE_INT8_MAX_ROWS,
    int8_linear_blocks,
    pack_int8_blocks,
    unpack_int8_blocks,
)
from tokenmill.engine.quantization import (
    dequantize_int8,
    int8_linear,
    quantize_int8,
    quantize_weight,
)

CAN_BUILD = disabled_reason() is None


@pytest.fixture(scope="module")
def gemv():
    if not CAN_BUILD:
        pytest.skip(f"no native kernels here: {disabled_reason()}")
    op = native.int8_gemv()
    assert op is not None, "an AVX-512 or AVX2 Linux machine with a compiler must build the kernel"
    return op


def test_the_kernel_builds_wherever_nothing_rules_it_out():
    result = build()
    if CAN_BUILD:
        assert result.library is not None and result.library.exists(), result.reason
    else:
        assert result.library is None and result.reason == disabled_reason()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.integers(1, 200),
    k=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_products_match_the_dequantized_weight(gemv, rows, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, scales = quantize_int8(torch.randn(n, k, generator=gen))
    x = torch.randn(rows, k, generator=gen).to(dtype)
    blocks, padded = pack_int8_blocks(q, scales)
    assert blocks.shape == (-(-n // 64), k, 64) and torch.equal(unpack_int8_blocks(blocks, n), q)
    expected = x.double() @ dequantize_int8(q, scales, torch.float64).t()
    got = gemv(x, blocks, padded, n)
    assert got.dtype == dtype and got.shape == (rows, n)
    # float32 products and sums, the reference in float64: apart only by rounding, then the output dtype's
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    scale = expected.abs().max().item() + 1e-6
    assert (got.double() - expected).abs().max().item() <= tolerance * scale


@pytest.mark.parametrize("rows", [23, 24, 31, 97])
def test_bf16_batches_match_in_chunks_of_k_and_with_an_odd_k(gemv, rows):
    # From 24 rows of bf16 the kernel converts k in chunks of 512 (256 pairs) and takes bf16 dot products.
    gen = torch.Generator().manual_seed(rows)
    q, scales = quantize_int8(torch.randn(70, 1101, generator=gen))
    blocks, padded = pack_int8_blocks(q, scales)
    x = torch.randn(rows, 1101, generator=gen).to(torch.bfloat16)
    expected = x.double() @ dequantize_int8(q, scales, torch.float64).t()
    got = gemv(x, blocks, padded, 70).double()
    assert (got - expected).abs().max().item() <= 8e-3 * expected.abs().max().item()


def test_layers_take_the_kernel_for_decode_batches_and_the_dequantized_weight_above(gemv):
    q, scales = quantize_int8(torch.randn(96, 80))
    blocks, padded = pack_int8_blocks(q, scales)
    bias = torch.randn(96)
    calls = []

    def spy(*args):
        calls.append(args[0].shape[0])
        return gemv(*args)

    for rows in (1, NATIVE_INT8_MAX_ROWS, NATIVE_INT8_MAX_ROWS + 1):
        x = torch.randn(rows, 80)
        got = int8_linear_blocks(x, blocks, padded, 96, bias, spy)
        torch.testing.assert_close(got, int8_linear(x, q, scales, bias), rtol=1e-5, atol=1e-5)
    assert calls == [1, NATIVE_INT8_MAX_ROWS]  # past the limit: the dequantized weight
    x = torch.randn(2, 3, 80)  # leading dims are kept
    assert int8_linear_blocks(x, blocks, padded, 96, None, spy).shape == (2, 3, 96) and calls[-1] == 6
    # bf16 rows go further where the CPU has bf16 dot products, and all the way on AVX2 (no
    # 16-bit GEMM there to hand over to)
    x = torch.randn(NATIVE_INT8_MAX_ROWS + 1, 80, dtype=torch.bfloat16)
    int8_linear_blocks(x, blocks, padded, 96, None, spy)
    assert (calls[-1] == NATIVE_INT8_MAX_ROWS + 1) == (native.bf16_dot_products() or isa() == "AVX2")


def test_many_rows_are_converted_to_float32_by_aten_with_the_same_result(gemv):
    q, scales = quantize_int8(torch.randn(64, 512))
    blocks, padded = pack_int8_blocks(q, scales)
    x = torch.randn(200, 512, dtype=torch.bfloat16)  # 102,400 elements: past the kernel's own conversion
    expected = x.double() @ dequantize_int8(q, scales, torch.float64).t()
    for rows in (200, 100):  # 51,200 elements: converted by the kernel
        got = gemv(x[:rows], blocks, padded, 64).double()
        assert (got - expected[:rows]).abs().max().item() <= 8e-3 * expected.abs().max().item()


def test_a_layer_gives_the_same_answer_in_either_layout(gemv, monkeypatch):
    qw = quantize_weight(torch.randn(130, 64), "int8")
    blocked = Int8Weights(qw, torch.bfloat16)
    with monkeypatch.context() as m:
        m.setattr(native, "int8_gemv", lambda: None)  # as on a machine where it does not build
        plain = Int8Weights(qw, torch.bfloat16)
    assert blocked.blocked and not plain.blocked
    assert blocked.qweight.shape == (3, 64, 64) and plain.qweight.shape == (130, 64)
    q, s = blocked.int8_weight()
    assert torch.equal(q, plain.qweight) and torch.equal(s.to(torch.bfloat16), plain.scales)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(blocked(x, None), plain(x, None), rtol=2e-2, atol=2e-2)
    # A module moved to another dtype keeps working, and it pickles (no operator kept on it).
    moved = pickle.loads(pickle.dumps(blocked)).to(torch.float16)
    torch.testing.assert_close(moved(x.half(), None).float(), blocked(x, None).float(), rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_refused_by_name(gemv):
    q, scales = quantize_int8(torch.randn(64, 32))
    blocks, padded = pack_int8_blocks(q, scales)
    x = torch.randn(1, 32)
    with pytest.raises(RuntimeError, match="x has 16 columns, the weight 32"):
        gemv(torch.randn(1, 16), blocks, padded, 64)
    with pytest.raises(RuntimeError, match="the weight must be int8"):
        gemv(x, q, padded, 64)
    with pytest.raises(RuntimeError, match="n=65 does not fit 1 blocks"):
        gemv(x, blocks, padded, 65)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        gemv(x, blocks, padded.to(torch.bfloat16), 64)


def test_turned_off_it_says_why(monkeypatch):
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    result = build()
    assert result.library is None and result.reason == "TOKENMILL_NATIVE_KERNELS=0"
    monkeypatch.delenv("TOKENMILL_NATIVE_KERNELS")
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert disabled_reason() in (
        "no C++ compiler found (set CXX, or install g++)",
        *([] if CAN_BUILD else [disabled_reason()]),
    )


def _build_in_a_fresh_process(env: dict[str, str]) -> tuple[int, str]:
    # A fresh process: this one has the kernel loaded already, and build() then reuses it.
    code = "from tokenmill.engine.native.builder import build; print(build().reason)"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    return done.returncode, done.stdout.strip()


@pytest.mark.skipif(not CAN_BUILD, reason=f"no native kernels here: {disabled_reason()}")
def test_a_failing_compiler_or_an_unusable_cache_is_a_reason_not_a_crash(tmp_path):
    code, reason = _build_in_a_fresh_process({"TOKENMILL_CACHE_DIR": str(tmp_path), "CXX": "false"})
    assert code == 0 and reason.startswith("false failed on cpu_kernels-"), reason
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == [".build.lock"]  # nothing half-written
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code, reason = _build_in_a_fresh_process({"TOKENMILL_CACHE_DIR": str(not_a_folder)})
    assert code == 0 and reason.startswith("could not build cpu_kernels: NotADirectoryError"), reason


_AVX2_PRODUCTS = """
import torch
from tokenmill.engine import native
from tokenmill.engine.native.builder import build
from tokenmill.engine.native.int8 import pack_int8_blocks
from tokenmill.engine.quantization import dequantize_int8, quantize_int8
print(build().reason)
gen = torch.Generator().manual_seed(0)
for rows, n, k in [(1, 100, 33), (2, 64, 8), (3, 130, 200), (5, 7, 64)]:
    q, scale = quantize_int8(torch.randn(n, k, generator=gen))
    packed, padded = pack_int8_blocks(q, scale)
    x = torch.randn(rows, k, generator=gen)
    expected = (x.double() @ dequantize_int8(q, scale, torch.float32).double().T).float()
    torch.testing.assert_close(native.int8_gemv()(x, packed, padded, n), expected, rtol=1e-4, atol=1e-4)
print("products match")
"""


@pytest.mark.skipif(not CAN_BUILD, reason=f"no native kernels here: {disabled_reason()}")
def test_the_avx2_form_builds_and_matches_on_any_cpu_that_builds_one(tmp_path):
    """Whichever ISA this CPU has, the AVX2 form (every AVX-512 CPU runs it too) is built and checked,
    and an ISA the CPU lacks, or none at all, is a reason that names what is allowed. The form is
    built into the user's cache, as a user asking for it gets it: on an AVX2 CPU it is the build
    ``make venv`` made (compiling it again cost a minute of the suite), on an AVX-512 CPU a new one."""
    env = {**os.environ, "TOKENMILL_NATIVE_ISA": "avx2"}
    done = subprocess.run(
        [sys.executable, "-c", _AVX2_PRODUCTS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reason, verdict = done.stdout.strip().splitlines()
    assert reason.startswith("cpu_kernels (AVX2): ") and verdict == "products match"
    code, reason = _build_in_a_fresh_process(
        {"TOKENMILL_CACHE_DIR": str(tmp_path), "TOKENMILL_NATIVE_ISA": "SSE4"}
    )
    assert code == 0 and reason.startswith("TOKENMILL_NATIVE_ISA=SSE4: this CPU"), reason
    assert reason.endswith(("allows AVX512 or AVX2", "allows AVX2")), reason


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 70),
    dim=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rms_norm_rounds_as_its_pytorch_form(gemv, rows, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=gen).to(dtype)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    with_native = norm(x)
    x32 = x.float()  # the PyTorch form, as RMSNorm computes it without the kernel
    reference = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    assert with_native.dtype == dtype and with_native.shape == x.shape
    # Only the order of the float32 sum of squares differs. One step of the dtype in the normalized
    # row becomes at most two in the product with the weight (rounded again).
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    error = (with_native.float() - reference.float()).abs()
    assert torch.all(error <= 2 * step * reference.float().abs() + 1e-4 * step)
    if dtype != torch.float32:  # rounded to 8 or 11 bits, nearly every value comes out the same
        assert (error > 0).sum().item() <= 2 + 0.01 * error.numel()


def test_rms_norm_takes_strided_rows_and_refuses_mismatches(gemv):
    op = native.rms_norm()
    x = torch.randn(4, 6, 8)[:, ::2]  # not contiguous
    weight = torch.randn(8)
    x32 = x.float()
    torch.testing.assert_close(
        op(x, weight, 1e-6), weight * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    )
    with pytest.raises(RuntimeError, match="the weight must have the size of x's last dim"):
        op(x, torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="x and the weight must share a dtype"):
        op(x, weight.to(torch.bfloat16), 1e-6)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    n=st.integers(1, 70),
    k=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_half_gemv_gives_the_weights_products(gemv, rows, n, k, dtype, seed):
    # n past a group of 8 weight rows and k past the vector width, with tails of every size
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    got = native.half_gemv()(x, weight)
    assert got.dtype == dtype and got.shape == (rows, n)
    expected = x.double() @ weight.double().t()
    # float32 products and sums, rounded once to the dtype: one step of it, plus summation order
    step = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert torch.all((got.double() - expected).abs() <= step * expected.abs() + 1e-5 * k)


def test_linear_takes_half_gemv_for_decode_rows_and_refuses_bad_arguments(gemv, monkeypatch):
    from tokenmill.engine.models import layers

    op = native.half_gemv()
    calls = []
    monkeypatch.setattr(native, "half_gemv", lambda: lambda x, w: calls.append(x.shape[0]) or op(x, w))
    weight = torch.randn(40, 24).to(torch.bfloat16)
    bias = torch.randn(40).to(torch.bfloat16)
    monkeypatch.setattr(layers, "native_half_max_rows", lambda: layers.NATIVE_HALF_MAX_ROWS)
    for rows in (1, layers.NATIVE_HALF_MAX_ROWS, layers.NATIVE_HALF_MAX_ROWS + 1):
        x = torch.randn(rows, 24).to(torch.bfloat16)
        # the bias is added to the rounded product, so the result may round once more than F.linear's
        torch.testing.assert_close(
            layers.linear(x, weight, bias),
            torch.nn.functional.linear(x, weight, bias),
            rtol=2**-7,
            atol=2**-6,
        )
    layers.linear(torch.randn(2, 24), weight.float())  # float32: PyTorch's
    assert calls == [1, layers.NATIVE_HALF_MAX_ROWS]
    # Without oneDNN's bf16 packing, every batch below float32's GEMM (F.linear's bf16 GEMM is the
    # slower path there), and prefill-sized batches in float32.
    monkeypatch.setattr(layers, "native_half_max_rows", lambda: layers.FLOAT32_GEMM_MIN_ROWS - 1)
    monkeypatch.setattr(layers, "float32_gemm_min_rows", lambda: layers.FLOAT32_GEMM_MIN_ROWS)
    calls.clear()
    for rows in (layers.FLOAT32_GEMM_MIN_ROWS - 1, layers.FLOAT32_GEMM_MIN_ROWS):
        x = torch.randn(rows, 24).to(torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(layers.linear(x, weight, bias).float(), want, rtol=2**-7, atol=2**-6)
    assert calls == [layers.FLOAT32_GEMM_MIN_ROWS - 1]
    monkeypatch.undo()
    packs = packing_supported(torch.bfloat16, torch.device("cpu"))
    assert layers.native_half_max_rows() == (layers.NATIVE_HALF_MAX_ROWS if packs else 127)
    assert layers.float32_gemm_min_rows() == (math.inf if packs else 128)
    with pytest.raises(RuntimeError, match="x and the weight must share a dtype"):
        op(torch.randn(1, 24), weight)
    with pytest.raises(RuntimeError, match="x has 23 columns, the weight 24"):
        op(torch.randn(1, 23).to(torch.bfloat16), weight)
    with pytest.raises(RuntimeError, match="contiguous 2-D bfloat16 or float16"):
        op(torch.randn(1, 40).to(torch.bfloat16), weight.t())


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 40),
    heads=st.integers(1, 6),
    half=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotary_in_place_rounds_as_its_pytorch_form(gemv, tokens, heads, half, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = 2 * half
    rows = torch.randn(tokens, heads + 1, dim, generator=gen).to(dtype)
    x = rows[:, 1:]  # strided, as q and k are views of one qkv product
    cos, sin = (torch.randn(tokens, 1, dim, generator=gen).to(dtype) for _ in range(2))
    reference = x * cos + torch.roll(x, half, dims=-1) * sin  # layers.apply_rotary's PyTorch form
    untouched = rows[:, 0].clone()
    out = apply_rotary(x, cos, sin)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, reference)
    assert torch.equal(rows[:, 0], untouched)


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 20),
    inner=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1.0, 30.0]),  # 30: e^-|g| far below float32's smallest normal
    seed=st.integers(0, 2**31 - 1),
)
def test_silu_and_mul_rounds_as_its_pytorch_form(gemv, tokens, inner, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, 2 * inner, generator=gen) * scale).to(dtype)
    got = native.silu_and_mul()(x)
    gate, up = x.split(inner, dim=-1)
    reference = torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and got.shape == reference.shape
    # e^x is within 2 ulp of PyTorch's: float32 may differ in the last bits; a 16-bit result only
    # where silu lands on a rounding boundary of the dtype, and then by one step.
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    error = (got.float() - reference.float()).abs()
    assert torch.all(error <= 2 * step * reference.float().abs() + 1e-30)
    if dtype != torch.float32:
        assert (error > 0).sum().item() <= 1 + 0.01 * error.numel()


def test_rotary_and_silu_refuse_bad_shapes_by_name(gemv):
    with pytest.raises(RuntimeError, match="an even head_dim"):
        native.rotary_()(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.zeros(2, 1, 3))
    with pytest.raises(RuntimeError, match="cos and sin must have x's dtype"):
        half_cos = torch.zeros(2, 1, 4, dtype=torch.bfloat16)
        native.rotary_()(torch.zeros(2, 1, 4), half_cos, torch.zeros(2, 1, 4))
    with pytest.raises(RuntimeError, match=r"must be \[tokens, 2 \* intermediate\]"):
        native.silu_and_mul()(torch.zeros(2, 3))
