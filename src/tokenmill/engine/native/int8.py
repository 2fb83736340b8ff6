"""int8 weights in the native kernel's block layout, and the layer product over them.

``pack_int8_blocks`` lays a ``[N, K]`` int8 weight out as ``[ceil(N/64), K, 64]``
(int8_gemv.cpp reads each block as one sequential stream); ``int8_linear_blocks``
sends decode-sized batches to the kernel and larger ones through the dequantized
weight, where the model dtype's GEMM is faster (benchmarks/int8_kernel.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from tokenmill.engine.native import Int8Gemv, bf16_dot_products
from tokenmill.engine.native.builder import isa

INT8_BLOCK = 64  # output channels per block of the kernel's layout
NATIVE_INT8_MAX_ROWS = 128  # rows past which dequantize + GEMM is faster
NATIVE_INT8_MAX_ROWS_BF16 = 512  # bf16 rows on a CPU with AVX-512 BF16: the kernel's dot-product path


def pack_int8_blocks(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The native kernel's layout: ``[ceil(N/64), K, 64]``, 64 output channels per block and
    k-major inside it, so a block is one sequential stream; rows past N are zeros. The scales
    come back float32, padded alike."""
    n, k = q.shape
    padded = -(-n // INT8_BLOCK) * INT8_BLOCK
    blocks = q.new_zeros(padded, k)
    blocks[:n] = q
    padded_scales = torch.zeros(padded, dtype=torch.float32, device=scales.device)
    padded_scales[:n] = scales.float()
    return blocks.view(padded // INT8_BLOCK, INT8_BLOCK, k).transpose(1, 2).contiguous(), padded_scales


def unpack_int8_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, K]`` int8 back from ``pack_int8_blocks`` (a copy, or a view of a single block)."""
    return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:n]


def int8_linear_blocks(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    gemv: Int8Gemv | None,
) -> torch.Tensor:
    """``x W^T (+ b)`` for ``W = blocks * scales`` (float32 scales): the native kernel for up to
    ``NATIVE_INT8_MAX_ROWS`` rows on CPU (``NATIVE_INT8_MAX_ROWS_BF16`` for bf16 activations on a
    CPU with AVX-512 BF16, every batch of 16-bit rows on AVX2), else the dequantized weight."""
    # Every int8 layer of every step comes here: a decode's [T, K] rows go in without reshaping.
    if gemv is not None and x.is_cpu:
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= _row_limit(x.dtype):
            y = gemv(rows, blocks, scales, n)
            if rows is not x:
                y = y.reshape(*x.shape[:-1], n)
            return y if bias is None else y + bias
    weight = unpack_int8_blocks(blocks, n).to(x.dtype) * scales[:n].to(x.dtype)[:, None]
    return F.linear(x, weight, bias)


@functools.cache
def _row_limit(dtype: torch.dtype) -> float:
    if dtype in (torch.bfloat16, torch.float16) and isa() == "AVX2":
        # No 16-bit GEMM to hand over to: PyTorch's bf16 F.linear runs unpacked on AVX2, and
        # dequantize + GEMM measured 5.3-6.4x slower than the kernel from 64 to 1024 rows.
        return math.inf
    return (
        NATIVE_INT8_MAX_ROWS_BF16 if dtype == torch.bfloat16 and bf16_dot_products() else NATIVE_INT8_MAX_ROWS
    )
