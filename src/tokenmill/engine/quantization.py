"""Weight-only quantization, done once at load: int8 per output channel, int4 per group.

Each row of a linear layer's weight (one output channel) gets its own scale,
``max |w| / 127``, and is stored as int8 (``round(w / scale)``), a quarter of
fp32 and half of bf16: decode on CPU streams weights from memory, so half the
bytes is most of the win. The matmul on CPU is PyTorch's
``_weight_int8pack_mm`` (int8 weights, activations in the model dtype,
``(x @ q^T) * scale``). That kernel is a loop of matrix-vector products: its
time grows with every row, and past ~32 rows (measured on a 768x3072 weight)
dequantizing the weight for the call and running the model dtype's GEMM is
faster, so big prefill and decode batches take that path. Off CPU the weight
is dequantized per call, which saves the memory but not the time.

int4 is group-wise (``INT4_GROUP`` = 128 inputs per group, or the largest of
64 and 32 that divides a smaller layer), asymmetric: per group a scale
``(max - min) / 15`` and a zero, ``w ~ (q - 8) * scale + zero`` with q in 0..15,
packed two to a byte by ``_convert_weight_to_int4pack_for_cpu`` for
``_weight_int4pack_mm_for_cpu``. That layout is opaque, so int4 has no
dequantize-for-the-call path: every batch size goes through the kernel, whose
time grows with the rows (see docs/benchmarks.md).

fp8 is float8 e4m3 weights with one scale per row and activations quantized
per token as they come (``fp8_linear``): on Hopper through ``torch._scaled_mm``,
elsewhere a float32 reference of the same arithmetic, so it is tested anywhere.

The embedding and the LM head stay in the model dtype, as vLLM and most
published int8 checkpoints leave them: they are a small share of a large
model's weights and the most sensitive to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8", "int4", "fp8")
FP8_MAX = 448.0  # largest float8 e4m3 value
INT4_GROUP = 128
_INT8_MAX = 127
INT8PACK_MAX_ROWS = 32  # above this many rows, dequantize + GEMM beats _weight_int8pack_mm


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): ``q`` int8 of ``weight``'s shape, ``scales`` one per row in float32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / _INT8_MAX
    q = torch.round(w / scales[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales[:, None]).to(dtype)


_HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")  # looked up once: linear layers run every step


def int8_kernel_supported(x: torch.Tensor) -> bool:
    return (
        _HAS_INT8PACK and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T (+ b)`` with ``W = q * scales`` per row."""
    if int8_kernel_supported(x) and x.numel() // x.shape[-1] <= INT8PACK_MAX_ROWS:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), q, scales.to(x.dtype))
        y = y.reshape(*shape[:-1], q.shape[0])
        return y if bias is None else y + bias
    # One pass in the activations' dtype (through float32 it takes three).
    return F.linear(x, q.to(x.dtype) * scales.to(x.dtype)[:, None], bias)


def int4_group_size(in_features: int) -> int | None:
    """The group size for a layer with ``in_features`` inputs; None if no supported one divides it."""
    return next((g for g in (INT4_GROUP, 64, 32) if in_features % g == 0), None)


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scales, zeros): ``q`` int32 in 0..15 of ``weight``'s shape; scales and zeros ``[rows, groups]``."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = (high - low).clamp(min=1e-8) / 15
    q = torch.clamp(torch.round((w - low) / scales), 0, 15).to(torch.int32).reshape(rows, cols)
    return q, scales.squeeze(-1), (low + 8 * scales).squeeze(-1)


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    rows, cols = q.shape
    grouped = (q.reshape(rows, cols // group, group).float() - 8) * scales[..., None] + zeros[..., None]
    return grouped.reshape(rows, cols).to(dtype)


def int4_kernel_supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales-and-zeros ``[groups, rows, 2]``) in the CPU kernel's layout."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, scales_zeros


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int, bias: torch.Tensor | None
) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, shape[-1]), packed, group, scales_zeros.to(x.dtype)
    )
    y = y.reshape(*shape[:-1], packed.shape[0])
    return y if bias is None else y + bias


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): ``q`` float8 e4m3 of ``weight``'s shape, ``scales`` one per row in float32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` ([tokens, features]) in float8 e4m3, with one scale per token (``[tokens, 1]``)."""
    x32 = x.float()
    scales = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x32 / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def fp8_scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise scaled fp8 matmul: Hopper or newer (compute capability 9.0+). Asked once per layer, at
    quantization, not on every step."""
    return (
        device.type == "cuda"
        and torch.cuda.get_device_capability(device) >= (9, 0)
        and hasattr(torch, "_scaled_mm")
    )


def fp8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    use_kernel: bool,
) -> torch.Tensor:
    """``x W^T (+ b)`` with fp8 weights (row-wise scales) and activations quantized per token on the fly.

    On Hopper the product runs in fp8 through ``torch._scaled_mm``; elsewhere the
    same quantized values are dequantized and multiplied in float32 (the reference
    path), so every machine computes what the GPU computes, up to summation order. ``use_kernel``:
    ``fp8_scaled_mm_supported`` of the weight's device."""
    shape = x.shape
    xq, x_scales = quantize_activations_fp8(x.reshape(-1, shape[-1]))
    if use_kernel:
        y = torch._scaled_mm(xq, q.t(), scale_a=x_scales, scale_b=scales[None, :].float(), out_dtype=x.dtype)
    else:
        y = ((xq.float() * x_scales) @ (q.float() * scales[:, None].float()).t()).to(x.dtype)
    y = y.reshape(*shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize every layer that can be (``quantize(method)``), LM head aside; returns how many."""
    if method not in QUANTIZATION_METHODS:
        allowed = ", ".join(QUANTIZATION_METHODS)
        raise ValueError(f"quantization={method!r} is invalid: allowed {allowed}, or none")
    head = getattr(model, "lm_head", None)
    return sum(bool(m.quantize(method)) for m in model.modules() if hasattr(m, "quantize") and m is not head)
