"""fp8 linear layers: float8 e4m3 weights with one scale per row and activations quantized
per token as they come (``fp8_linear``): on Hopper through ``torch._scaled_mm``,
elsewhere a float32 reference of the same arithmetic, so it is tested anywhere.
Checkpoints published in fp8 bring other layouts, all read as they are: one
scale per tensor (expanded to rows, exactly), a static activation scale, no
activation quantization (weight-only), or scales per 128x128 block of the
weight with activations quantized per 128 inputs of each token (DeepSeek's
layout, ``fp8_block_linear``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest float8 e4m3 value


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): ``q`` float8 e4m3 of ``weight``'s shape, ``scales`` one per row in float32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def quantize_activations_fp8(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` ([tokens, features]) in float8 e4m3, with one scale per token (``[tokens, 1]``), or
    with ``group``, one per ``group`` features of each token (``[tokens, features / group]``)."""
    x32 = x.float()
    if group is None:
        scales = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        return (x32 / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales
    tokens, features = x32.shape
    grouped = x32.reshape(tokens, -1, group)
    scales = grouped.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (grouped / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(tokens, features)
    return q, scales.squeeze(-1)


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
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x W^T (+ b)`` with fp8 weights (row-wise scales) and activations quantized per token on the fly,
    or with one static ``input_scale`` when the checkpoint brings one.

    On Hopper the product runs in fp8 through ``torch._scaled_mm``; elsewhere the
    same quantized values are dequantized and multiplied in float32 (the reference
    path), so every machine computes what the GPU computes, up to summation order. ``use_kernel``:
    ``fp8_scaled_mm_supported`` of the weight's device."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if input_scale is None:
        xq, x_scales = quantize_activations_fp8(flat)
    else:
        x_scales = input_scale.float().reshape(1, 1).expand(flat.shape[0], 1)
        xq = (flat.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    if use_kernel:
        y = torch._scaled_mm(
            xq, q.t(), scale_a=x_scales.contiguous(), scale_b=scales[None, :].float(), out_dtype=x.dtype
        )
    else:
        y = ((xq.float() * x_scales) @ (q.float() * scales[:, None].float()).t()).to(x.dtype)
    y = y.reshape(*shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def dequantize_fp8_blocks(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Float32 weights from fp8 ``q`` and one scale per ``block`` (rows x columns) tile; edge tiles may be
    partial."""
    rows, cols = q.shape
    full = scales.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def fp8_block_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None,
    use_kernel: bool,
) -> torch.Tensor:
    """``x W^T (+ b)`` for block-scaled fp8 weights (DeepSeek's layout): activations are quantized per
    token and per ``block[1]`` inputs, the product summed in float32. ``use_kernel``: the device's
    ``scaled_mm`` takes block scales (``fp8_block_kernel_works``, asked once at load)."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    xq, x_scales = quantize_activations_fp8(flat, block[1])
    if use_kernel:
        from torch.nn.functional import ScalingType, scaled_mm

        y = scaled_mm(
            xq,
            q.t(),
            x_scales.t().contiguous().t(),  # the kernel reads these scales column-major
            ScalingType.BlockWise1x128,
            scales.float().t(),
            ScalingType.BlockWise128x128,
            output_dtype=x.dtype,
        )
    else:
        dequantized = xq.float().reshape(flat.shape[0], -1, block[1]) * x_scales[..., None]
        y = (dequantized.reshape(flat.shape) @ dequantize_fp8_blocks(q, scales, block).t()).to(x.dtype)
    y = y.reshape(*shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def fp8_block_kernel_works(device: torch.device, block: tuple[int, int]) -> bool:
    """Whether this device's ``scaled_mm`` runs 128x128 block scales and agrees with the reference: tried
    once on small tensors at load (support depends on the GPU, CUDA and torch build)."""
    if device.type != "cuda" or block != (128, 128) or not fp8_scaled_mm_supported(device):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(256, 256, device=device, generator=gen)
        x = torch.randn(16, 256, device=device, generator=gen, dtype=torch.bfloat16)
        q, scales = quantize_fp8_blocks(w, block)
        got = fp8_block_linear(x, q, scales, block, None, use_kernel=True).float()
        want = fp8_block_linear(x, q, scales, block, None, use_kernel=False).float()
    except (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item()))


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales): fp8 ``q``, one float32 scale per ``block`` tile: ``[ceil(rows/b0), ceil(cols/b1)]``."""
    rows, cols = weight.shape
    b0, b1 = block
    padded = F.pad(weight.float(), (0, -cols % b1, 0, -rows % b0))
    tiles = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    scales = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    full = scales.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    q = (weight.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales
