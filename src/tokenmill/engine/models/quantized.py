"""The kernels of quantized linear layers, each built from a ``QuantizedWeight``.

A ``Linear`` holds one of these in place of its plain weight. Building one is
where device-specific choices are made once (the int4 CPU packing, whether
fp8 runs through ``scaled_mm``), so the step loop only calls ``forward``.
Tensors are buffers, so ``weight_bytes`` counts them and ``.to()`` moves them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine import native
from tokenmill.engine.fp8 import fp8_block_kernel_works, fp8_block_linear, fp8_linear, fp8_scaled_mm_supported
from tokenmill.engine.native.int8 import int8_linear_blocks, pack_int8_blocks, unpack_int8_blocks
from tokenmill.engine.quantization import (
    QuantizedWeight,
    dequantize_weight,
    int4_kernel_supported,
    int4_linear,
    int8_linear,
    pack_int4,
)

logger = logging.getLogger(__name__)


class Int8Weights(nn.Module):
    """On a CPU where tokenmill's kernel builds, the weight is kept in that kernel's block layout
    (``pack_int8_blocks``) and only there; elsewhere as ``[N, K]`` for PyTorch's kernel."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        q = qw.q.to(torch.int8)
        self.out_features = q.shape[0]
        # The operator is looked up per call (a cached lookup), not kept: modules stay picklable.
        self.blocked = q.device.type == "cpu" and native.int8_gemv() is not None
        if self.blocked:
            blocks, scales = pack_int8_blocks(q, qw.scales)
            self.register_buffer("qweight", blocks)
            self.register_buffer("scales", scales)
        else:
            self.register_buffer("qweight", q)
            self.register_buffer("scales", qw.scales.to(dtype))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Int8Weights:
        # .to(dtype), .half(), ... convert every floating buffer; the kernel takes float32 scales.
        super()._apply(fn, recurse)
        if self.blocked:
            self.scales = self.scales.float()
        return self

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q ``[N, K]`` int8, scales ``[N]``): the weight whatever the layout it is kept in."""
        if self.blocked:
            return unpack_int8_blocks(self.qweight, self.out_features), self.scales[: self.out_features]
        return self.qweight, self.scales

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.blocked:
            return int8_linear_blocks(
                x, self.qweight, self.scales, self.out_features, bias, native.int8_gemv()
            )
        return int8_linear(x, self.qweight, self.scales, bias)


class Int4Weights(nn.Module):
    """The CPU kernel's packed layout (see quantization.py)."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        assert qw.group is not None
        self.group = qw.group
        packed, scales_zeros = pack_int4(qw.q, qw.scales, qw.zero_points, dtype)
        self.register_buffer("qweight", packed)
        self.register_buffer("scales", scales_zeros)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scales, self.group, bias)


class Fp8Weights(nn.Module):
    """fp8 e4m3 weights with row or block scales; activations as ``QuantizedWeight.activations`` says."""

    def __init__(self, qw: QuantizedWeight):
        super().__init__()
        self.block = qw.block
        self.activations = qw.activations
        self.register_buffer("qweight", qw.q)
        self.register_buffer("scales", qw.scales.float())
        self.register_buffer("input_scale", None if qw.input_scale is None else qw.input_scale.float())
        device = qw.q.device
        if self.block is not None:
            self.use_kernel = fp8_block_kernel_works(device, self.block)
        else:
            self.use_kernel = fp8_scaled_mm_supported(device)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.activations == "none":  # weight-only: the checkpoint keeps activations in the model dtype
            weight = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            return F.linear(x, weight, bias)
        if self.block is not None:
            return fp8_block_linear(x, self.qweight, self.scales, self.block, bias, self.use_kernel)
        return fp8_linear(x, self.qweight, self.scales, bias, self.use_kernel, self.input_scale)


def build_quantized(qw: QuantizedWeight, dtype: torch.dtype) -> nn.Module | torch.Tensor:
    """The kernel module for ``qw``; where this device has no kernel for it (int4 off CPU), the
    dequantized plain weight instead, which keeps the model correct but not smaller."""
    if qw.method == "int8":
        return Int8Weights(qw, dtype)
    if qw.method == "int4":
        if int4_kernel_supported(qw.q.device):
            return Int4Weights(qw, dtype)
        logger.warning("no int4 kernel on %s: int4 weights are dequantized to %s at load", qw.q.device, dtype)
        return dequantize_weight(qw, dtype)
    return Fp8Weights(qw)
