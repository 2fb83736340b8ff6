"""tokenmill's C++ int8 kernel: built on this machine, the same products as the dequantized weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine import native
from tokenmill.engine.models.quantized import Int8Weights
from tokenmill.engine.native.build import build, disabled_reason
from tokenmill.engine.quantization import (
    NATIVE_INT8_MAX_ROWS,
    dequantize_int8,
    int8_linear,
    int8_linear_blocks,
    pack_int8_blocks,
    quantize_int8,
    quantize_weight,
    unpack_int8_blocks,
)

CAN_BUILD = disabled_reason() is None


@pytest.fixture(scope="module")
def gemv():
    if not CAN_BUILD:
        pytest.skip(f"no native kernels here: {disabled_reason()}")
    op = native.int8_gemv()
    assert op is not None, "an AVX-512 Linux machine with a compiler must build the kernel"
    return op


def test_the_kernel_builds_wherever_nothing_rules_it_out():
    result = build("int8_gemv")
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


def test_layers_take_the_kernel_for_decode_batches_and_the_dequantized_weight_above(gemv):
    q, scales = quantize_int8(torch.randn(96, 80))
    blocks, padded = pack_int8_blocks(q, scales)
    bias = torch.randn(96)
    for rows in (1, NATIVE_INT8_MAX_ROWS, NATIVE_INT8_MAX_ROWS + 1):
        x = torch.randn(2, rows, 80)  # leading dims are kept
        got = int8_linear_blocks(x, blocks, padded, 96, bias, gemv)
        expected = int8_linear(x, q, scales, bias)
        assert got.shape == (2, rows, 96)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
    monkeypatch.setattr(native, "int8_gemv", lambda: None)  # as on a machine where it does not build
    plain = Int8Weights(qw, torch.bfloat16)
    assert blocked.blocked and not plain.blocked
    assert blocked.qweight.shape == (3, 64, 64) and plain.qweight.shape == (130, 64)
    q, s = blocked.int8_weight()
    assert torch.equal(q, plain.qweight) and torch.equal(s.to(torch.bfloat16), plain.scales)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(blocked(x, None), plain(x, None), rtol=2e-2, atol=2e-2)


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


def test_turned_off_or_unbuildable_it_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "0")
    result = build("int8_gemv")
    assert result.library is None and result.reason == "TOKENMILL_NATIVE_KERNELS=0"
    if not CAN_BUILD:
        return
    monkeypatch.setenv("TOKENMILL_NATIVE_KERNELS", "1")
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    result = build("int8_gemv")
    assert result.library is None and "false failed on int8_gemv.cpp" in result.reason
    assert list(tmp_path.rglob("*")) == [tmp_path / "native"]  # no half-written library left
