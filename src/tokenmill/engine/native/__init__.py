"""tokenmill's own CPU kernels, in C++, compiled on first use (see builder.py).

- ``int8_gemv``: the int8 weight-only matmul (int8_gemv.cpp); quantized int8
  layers use it where it builds, and PyTorch's ``_weight_int8pack_mm`` elsewhere.
- ``half_gemv``: a bf16 or fp16 weight against a few rows (half_gemv.cpp): decode's
  products where oneDNN cannot pack the weight (AVX2 CPUs), in place of ``torch.mv``.
- ``rms_norm``: Llama's RMSNorm in one op (rms_norm.cpp); elsewhere its
  PyTorch form.
- ``paged_decode_attention``: decode attention read in place from the paged KV
  cache (paged_attention.cpp), for the ``cpu`` attention backend.
- ``rotary_`` and ``silu_and_mul``: the rotary embedding (in place) and SwiGLU's
  activation in one op each (rotary.cpp, silu_and_mul.cpp).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from tokenmill.engine.native.builder import build

logger = logging.getLogger(__name__)

Int8Gemv = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
HalfGemv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RmsNorm = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
# (q, k, v, cache, slots, block_table, seq_lens, block_size, scale, window) -> out
_T = torch.Tensor
Rotary = Callable[[_T, _T, _T], _T]
SiluAndMul = Callable[[_T], _T]
PagedDecodeAttention = Callable[[_T, _T, _T, _T, _T, _T, _T, int, float, int], _T]


@functools.cache
def unavailable_reason() -> str | None:
    """Why tokenmill's kernels are not in use in this process (logged once), or None when they are."""
    result = build()
    if result.library is None:
        logger.warning("tokenmill's CPU kernels are not in use, PyTorch's are: %s", result.reason)
        return result.reason
    logger.debug("loaded %s", result.reason)
    return None


def _loaded() -> bool:
    return unavailable_reason() is None


@functools.cache
def int8_gemv() -> Int8Gemv | None:
    """``torch.ops.tokenmill.int8_gemv(x, packed, scales, n)``, or None where the kernels cannot be
    built here (why is logged once)."""
    return torch.ops.tokenmill.int8_gemv.default if _loaded() else None


@functools.cache
def half_gemv() -> HalfGemv | None:
    """``torch.ops.tokenmill.half_gemv(x, weight)``, or None where the kernels cannot be built."""
    return torch.ops.tokenmill.half_gemv.default if _loaded() else None


@functools.cache
def rms_norm() -> RmsNorm | None:
    """``torch.ops.tokenmill.rms_norm(x, weight, eps)``, or None where the kernels cannot be built."""
    return torch.ops.tokenmill.rms_norm.default if _loaded() else None


@functools.cache
def paged_decode_attention() -> PagedDecodeAttention | None:
    """``torch.ops.tokenmill.paged_decode_attention``, or None where the kernels cannot be built."""
    return torch.ops.tokenmill.paged_decode_attention.default if _loaded() else None


@functools.cache
def rotary_() -> Rotary | None:
    """``torch.ops.tokenmill.rotary_(x, cos, sin)`` (rotates x in place), or None where the kernels
    cannot be built."""
    return torch.ops.tokenmill.rotary_.default if _loaded() else None


@functools.cache
def silu_and_mul() -> SiluAndMul | None:
    """``torch.ops.tokenmill.silu_and_mul(gate_up)``, or None where the kernels cannot be built."""
    return torch.ops.tokenmill.silu_and_mul.default if _loaded() else None


@functools.cache
def bf16_dot_products() -> bool:
    """Whether this CPU has AVX-512 BF16 (``vdpbf16ps``), which the int8 kernel uses for bf16
    batches of 24 rows and more."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in cpuinfo)
    except OSError:
        return False
