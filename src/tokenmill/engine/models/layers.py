"""Building blocks shared by the decoder models: norms, rotary embedding, MLP.

Numerics follow transformers' Llama code (norm in float32, rotary cos/sin
computed in float32 and applied in the model dtype) so that greedy tokens match
it exactly and logits within fp32 tolerance.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine import native
from tokenmill.engine.config import RopeConfig
from tokenmill.engine.errors import ModelLoadError
from tokenmill.engine.models.cpu_packing import pack_weight, packed_linear, packing_supported
from tokenmill.engine.models.quantized import build_quantized
from tokenmill.engine.quantization import QuantizedWeight, int4_kernel_supported, quantize_weight

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# Rows of x up to which a 16-bit weight on CPU takes tokenmill's GEMV where oneDNN packs bf16
# weights (AVX-512): a packed layer never gets here, and an fp16 one may have a better GEMM above.
NATIVE_HALF_MAX_ROWS = 4
# Where oneDNN cannot pack (AVX2), PyTorch's 16-bit GEMM runs at a quarter of the GEMV's speed or
# less, so the GEMV takes every batch up to here; from FLOAT32_GEMM_MIN_ROWS rows (prefill) the
# product is compute-bound and float32's GEMM, weight converted for the call, is faster: on a
# 2-core AVX2 EPYC 1.25-1.4x the GEMV at 128 rows and 1.4-2.7x at 2048 (the 125M model's layers).
FLOAT32_GEMM_MIN_ROWS = 128


@functools.cache
def native_half_max_rows() -> float:
    if packing_supported(torch.bfloat16, torch.device("cpu")):
        return NATIVE_HALF_MAX_ROWS
    return FLOAT32_GEMM_MIN_ROWS - 1


@functools.cache
def float32_gemm_min_rows() -> float:
    """Rows of 16-bit x from which a CPU product runs in float32 (where oneDNN cannot pack bf16)."""
    return math.inf if packing_supported(torch.bfloat16, torch.device("cpu")) else FLOAT32_GEMM_MIN_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b``. On CPU a bf16 or fp16 weight goes through tokenmill's GEMV for a few rows (see
    ``native_half_max_rows``; over the 125M model's weights on an AVX2 EPYC, 1.26x ``torch.mv`` at
    one row and 2.3-4.4x F.linear at 2-64) and, where oneDNN cannot pack, through float32's GEMM
    for many (``float32_gemm_min_rows``); elsewhere a single row takes PyTorch's GEMV, which
    streams bf16 weights about twice as fast as F.linear's GEMM."""
    if (
        x.is_cpu
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and weight.is_contiguous()
    ):
        rows = x.shape[0]
        if rows <= native_half_max_rows() and (gemv := native.half_gemv()) is not None:
            y = gemv(x, weight)
            return y if bias is None else y + bias
        if rows >= float32_gemm_min_rows():
            b = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), b).to(x.dtype)
    if x.dim() == 2 and x.shape[0] == 1:
        y = torch.mv(weight, x[0]).unsqueeze(0)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """``y = x W^T (+ b)`` with uninitialised parameters: every value comes from the checkpoint.

    Skipping torch's random init keeps start-up fast (it is the slowest part of
    building a model), and owning the class gives quantized and tensor-parallel
    variants one place to plug in.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN layout, see cpu_packing
        self.quantized: nn.Module | None = None  # a kernel of models/quantized.py, in place of weight
        self._staged: QuantizedWeight | None = None  # a pre-quantized checkpoint's rows, as they load

    def quantize(self, method: str, group: int | None = None) -> bool:
        """Swap the weight for its quantized form (see quantization.py); the plain copy is freed.
        False if this layer cannot take ``method`` (it keeps its weight). ``group``: int4's group size,
        one for the whole model (``quantize_model`` picks it)."""
        weight = self.weight.data
        if method == "int4" and not int4_kernel_supported(weight.device):
            return False
        qw = quantize_weight(weight, method, group)
        if qw is None:
            return False
        self._install(qw)
        return True

    def stage_rows(self, part: QuantizedWeight, start: int) -> None:
        """Take one checkpoint tensor's rows of a pre-quantized weight (q, k and v are one fused
        layer); ``finish_loading`` builds the kernel once every part is in."""
        if self._staged is None:
            rows, cols = self.weight.shape
            if part.shape[1] != cols:
                raise ValueError(f"has {part.shape[1]} inputs, expected {cols}")
            self._staged = part.empty_rows(rows)
            # The plain weight will never be filled: free it now, not after the whole model loads.
            self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
        elif part.shape[1] != self._staged.shape[1]:
            raise ValueError(f"has {part.shape[1]} inputs, expected {self._staged.shape[1]}")
        self._staged = self._staged.place_rows(part, start)

    def finish_loading(self) -> None:
        if self._staged is not None:
            self._install(self._staged)
            self._staged = None

    def _install(self, qw: QuantizedWeight) -> None:
        built = build_quantized(qw, self.weight.dtype)
        if isinstance(built, torch.Tensor):  # no kernel on this device: the dequantized plain weight
            self.weight.data = built
            return
        self.quantized = built
        self.weight.data = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)

    def pack(self) -> bool:
        """Swap the weight for its oneDNN-packed form (bf16 on CPU); the plain copy is freed."""
        if self.quantized is not None:
            return False  # quantized weights have their own kernels
        packed = pack_weight(self.weight.data)
        if packed is None:
            return False
        self.packed = packed
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.quantized is not None:
            return self.quantized(x, self.bias)
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


_NATIVE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # of the elementwise CPU kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.is_cpu and dtype in _NATIVE_DTYPES and self.weight.dtype == dtype:
            norm = native.rms_norm()
            if norm is not None:  # the same rounding in one op (native/rms_norm.cpp)
                return norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP with gate and up projections fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cpu and gate_up.dim() == 2 and gate_up.dtype in _NATIVE_DTYPES:
            op = native.silu_and_mul()
            if op is not None:  # one op, the same rounding (native/silu_and_mul.cpp)
                return self.down_proj(op(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies per rotary pair, with the checkpoint's rope scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling_type == "default":
        return inv_freq
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    raise ModelLoadError(
        f"rope_type={rope.scaling_type!r} is not supported: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by the factor, short ones kept,
    # and the band between interpolated smoothly.
    old_len = rope.original_max_position_embeddings or 8192
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embedding over a cos/sin table indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.rope = rope
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """Compute the table on the device; called once the model's memory exists."""
        inv_freq = rope_inv_freq(self.head_dim, self.rope).to(device)
        pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        # The first half negated: apply_rotary's roll then gives rotate-half's products exactly
        # (negation is exact), in one op where slicing, negating and concatenating take four.
        half = self.head_dim // 2
        self.sin = torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1).to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin rows for the step's positions, ``[T, 1, head_dim]``: looked up
        once per step and shared by every layer."""
        assert self.cos is not None and self.sin is not None, "RotaryEmbedding.build() not called"
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] from RotaryEmbedding.lookup.

    Rotate-half: ``x * cos + cat(-x2, x1) * sin``, with the minus carried by ``sin``'s first half.
    On CPU tokenmill's op rotates x in place, with the same rounding (native/rotary.cpp; four
    ops and three temporaries in PyTorch): use the result, and do not read x again."""
    if x.is_cpu and x.dtype in _NATIVE_DTYPES and cos.dtype == x.dtype and x.stride(-1) == 1:
        rotary = native.rotary_()
        if rotary is not None:
            return rotary(x, cos, sin)
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin
