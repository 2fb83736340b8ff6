"""Building blocks shared by the decoder models: norms, rotary embedding, MLP.

Numerics follow transformers' Llama code (norm in float32, rotary cos/sin
computed in float32 and applied in the model dtype) so that greedy tokens match
it exactly and logits within fp32 tolerance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine.config import RopeConfig
from tokenmill.engine.errors import ModelLoadError
from tokenmill.engine.models.cpu_packing import pack_weight, packed_linear
from tokenmill.engine.quantization import (
    fp8_linear,
    fp8_scaled_mm_supported,
    int4_group_size,
    int4_kernel_supported,
    int4_linear,
    int8_linear,
    pack_int4,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b``. A single row goes through matrix-vector: on CPU, PyTorch's GEMV
    streams bf16 weights about twice as fast as the GEMM path F.linear takes, and
    batch-1 decode is nothing but such rows."""
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
        self.qweight: torch.Tensor | None
        self.scales: torch.Tensor | None
        self.register_buffer("qweight", None)  # int8 weight and per-row scales, see quantization.py
        self.register_buffer("scales", None)
        self.int4_group = 0  # int4: inputs per group (scales holds scales and zeros)
        self.fp8 = False
        self.fp8_kernel = False  # torch._scaled_mm on this device (Hopper); else the reference path

    def quantize(self, method: str) -> bool:
        """Swap the weight for its quantized form (see quantization.py); the plain copy is freed.
        False if this layer cannot take ``method`` (it keeps its weight)."""
        weight = self.weight.data
        if method == "int4":
            group = int4_group_size(weight.shape[1])
            if group is None or not int4_kernel_supported(weight.device):
                return False
            q, scales, zeros = quantize_int4(weight, group)
            self.qweight, self.scales = pack_int4(q, scales, zeros, weight.dtype)
            self.int4_group = group
        elif method == "fp8":
            self.qweight, self.scales = quantize_fp8(weight)
            self.fp8 = True
            self.fp8_kernel = fp8_scaled_mm_supported(weight.device)
        else:
            q, scales = quantize_int8(weight)
            self.qweight, self.scales = q, scales.to(weight.dtype)
        self.weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        return True

    def pack(self) -> bool:
        """Swap the weight for its oneDNN-packed form (bf16 on CPU); the plain copy is freed."""
        if self.qweight is not None:
            return False  # int8 has its own kernel
        packed = pack_weight(self.weight.data)
        if packed is None:
            return False
        self.packed = packed
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        if self.qweight is not None:
            assert self.scales is not None
            if self.int4_group:
                return int4_linear(x, self.qweight, self.scales, self.int4_group, self.bias)
            if self.fp8:
                return fp8_linear(x, self.qweight, self.scales, self.bias, self.fp8_kernel)
            return int8_linear(x, self.qweight, self.scales, self.bias)
        return linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
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
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
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
        self.sin = emb.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows for the step's positions, ``[T, 1, head_dim]``: looked up
        once per step and shared by every layer."""
        assert self.cos is not None and self.sin is not None, "RotaryEmbedding.build() not called"
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, 1, head_dim] from RotaryEmbedding.lookup."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
