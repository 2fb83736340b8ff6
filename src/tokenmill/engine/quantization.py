"""Weight-only quantization, done once at load: int8 per output channel, int4 per group.

Each row of a linear layer's weight (one output channel) gets its own scale,
``max |w| / 127``, and is stored as int8 (``round(w / scale)``), a quarter of
fp32 and half of bf16: decode on CPU streams weights from memory, so half the
bytes is most of the win. The matmul on CPU is tokenmill's own kernel
(native/int8_gemv.cpp, built on first use) where it builds, with the weight
kept in its block layout (native/int8.py); it reads the weight at memory
speed, where PyTorch's ``_weight_int8pack_mm`` reaches about half of it on
short rows. Elsewhere it is ``_weight_int8pack_mm`` (int8 weights, activations
in the model dtype, ``(x @ q^T) * scale``). Both are loops of matrix-vector
products whose time grows with every row: past 128 rows (the native kernel; 512
for bf16 activations, which it multiplies with AVX-512 BF16 dot products) or 32
(PyTorch's), dequantizing the weight for the call and running the model
dtype's GEMM is faster, so big prefill batches take that path. Off CPU the
weight is dequantized per call, which saves the memory but not the time.

int4 is group-wise (``INT4_GROUP`` = 128 inputs per group, or the largest of
64 and 32 that divides a smaller layer), asymmetric with an integer zero point,
the convention of GPTQ, AWQ and compressed-tensors: per group a scale
``(max - min) / 15`` and a zero point ``z`` in -8..7, ``w ~ (q - z) * scale``
with q in -8..7. The CPU kernel (``_weight_int4pack_mm_for_cpu``) takes
``w = (u - 8) * scale + zero`` with u = q + 8 in 0..15, so its float zero is
``-z * scale``: published checkpoints load into it without re-quantizing. Its
packed layout is opaque, so int4 has no dequantize-for-the-call path: every
batch size goes through the kernel, whose time grows with the rows (see
docs/benchmarks.md).

fp8 is float8 e4m3 weights with a scale per row, or per 128x128 block (engine/fp8.py).

``QuantizedWeight`` is the one form every route goes through: quantizing a
checkpoint's weight at load, reading a pre-quantized checkpoint, and saving
one (quantized_checkpoint.py). A layer builds its kernel from it
(models/quantized.py).

The embedding stays in the model dtype. The LM head does under int4 and fp8,
as vLLM and most published checkpoints leave it, and is quantized under int8
(``LM_HEAD_QUANTIZED_BY_DEFAULT``; ``quantize_lm_head`` overrides both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.engine.errors import InvalidRequestError
from tokenmill.engine.fp8 import dequantize_fp8_blocks, quantize_fp8

QUANTIZATION_METHODS = ("int8", "int4", "fp8")
# Whether a method quantizes the LM head unless told otherwise. int8: yes, as PyTorch's own int8
# weight-only recipes (torchao, gpt-fast) do: per vocabulary row, it moves perplexity by a few
# hundredths of a percent, and at batch 1 the head is the widest read of a step (a 32k vocabulary
# over 768 inputs is 49 MB in bf16, two thirds of a 125M model's int8 layers). int4 and fp8: no,
# as llama.cpp's 4-bit mixes and vLLM's fp8 keep the head in higher precision.
LM_HEAD_QUANTIZED_BY_DEFAULT = {"int8": True, "int4": False, "fp8": False}
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
    """(q, scales, zero points): ``q`` int8 in -8..7 of ``weight``'s shape; float32 scales and int8 zero
    points in -8..7, ``[rows, groups]``; ``w ~ (q - zero point) * scale``."""
    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // group, group)
    # The range holds 0, so the zero point always fits in -8..7 (as compressed-tensors does).
    low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    scales = (high - low).clamp(min=1e-8) / 15
    zero_points = torch.clamp(-8 - torch.round(low / scales), -8, 7)
    q = torch.clamp(torch.round(w / scales) + zero_points, -8, 7)
    return (
        q.to(torch.int8).reshape(rows, cols),
        scales.squeeze(-1),
        zero_points.to(torch.int8).squeeze(-1),
    )


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """``(q - zero point) * scale`` per group; no zero points: symmetric (zero point 0)."""
    rows, cols = q.shape
    grouped = q.reshape(rows, cols // group, group).float()
    if zero_points is not None:
        grouped = grouped - zero_points.float()[..., None]
    return (grouped * scales.float()[..., None]).reshape(rows, cols).to(dtype)


def int4_kernel_supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pack_int4(
    q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales-and-zeros ``[groups, rows, 2]``) in the CPU kernel's layout."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    scales = scales.float()
    zeros = torch.zeros_like(scales) if zero_points is None else -zero_points.float() * scales
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


FP8_ACTIVATIONS = ("token", "tensor", "group", "none")


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear layer's weight in quantized form, ``[rows (outputs), cols (inputs)]``, whatever its route.

    - int8: ``q`` int8, ``scales`` float ``[rows]``.
    - int4: ``q`` int8 values in -8..7, ``scales`` float ``[rows, cols / group]``, ``zero_points`` int8
      of the same shape (None: symmetric).
    - fp8: ``q`` float8 e4m3, ``scales`` float32 ``[rows]``, or ``[ceil(rows / b0), ceil(cols / b1)]``
      with ``block``. ``activations``: ``token`` (dynamic per token), ``tensor`` (the static
      ``input_scale``), ``group`` (dynamic per token and ``block[1]`` inputs), ``none`` (weight-only).
    """

    method: str
    q: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None = None
    group: int | None = None
    block: tuple[int, int] | None = None
    activations: str = "token"
    input_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def rows(self, start: int, size: int) -> QuantizedWeight:
        """The rows ``start:start+size`` (one checkpoint tensor of a fused layer); block scales need the
        rows to start and end on block edges."""
        scales = self.scales
        if self.block is not None:
            b0 = self.block[0]
            if start % b0 or (size % b0 and start + size != self.shape[0]):
                raise ValueError(
                    f"rows {start}:{start + size} do not fall on {b0}-row block edges (a fused layer's "
                    "parts, q/k/v or gate/up, must each be whole blocks)"
                )
            scales = scales.narrow(0, start // b0, -(-size // b0))
        else:
            scales = scales.narrow(0, start, size)
        zero_points = None if self.zero_points is None else self.zero_points.narrow(0, start, size)
        return replace(self, q=self.q.narrow(0, start, size), scales=scales, zero_points=zero_points)

    def empty_rows(self, rows: int) -> QuantizedWeight:
        """Room for ``rows`` rows laid out like this one (a fused layer's whole weight)."""

        def grow(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.new_zeros((n, *t.shape[1:]))

        if self.block is not None:
            scales = grow(self.scales, -(-rows // self.block[0]))
        else:
            scales = grow(self.scales, rows)
        zero_points = None if self.zero_points is None else grow(self.zero_points, rows)
        return replace(self, q=grow(self.q, rows), scales=scales, zero_points=zero_points)

    def place_rows(self, part: QuantizedWeight, start: int) -> QuantizedWeight:
        """Copy ``part`` into rows ``start:`` of this weight; the result carries the larger input scale
        (one activation scale serves the whole fused layer: the larger never clips a part's inputs)."""
        layout = (self.method, self.group, self.block, self.activations, self.zero_points is None)
        theirs = (part.method, part.group, part.block, part.activations, part.zero_points is None)
        if layout != theirs:
            raise ValueError(f"is quantized as {theirs}, unlike the other parts of its layer: {layout}")
        target = self.rows(start, part.shape[0])
        target.q.copy_(part.q)
        target.scales.copy_(part.scales)
        if target.zero_points is not None and part.zero_points is not None:
            target.zero_points.copy_(part.zero_points)
        if part.input_scale is None:
            return self
        scale = part.input_scale.float().reshape(())
        if self.input_scale is not None:
            scale = torch.maximum(scale, self.input_scale.float().reshape(()))
        return replace(self, input_scale=scale)


def quantize_weight(weight: torch.Tensor, method: str, group: int | None = None) -> QuantizedWeight | None:
    """``weight`` quantized the way ``--quantization method`` does at load; None when this layer cannot
    take it (int4 with no group size that divides its inputs). ``group``: int4's group size (default:
    the largest supported one that divides the inputs)."""
    if method == "int8":
        q, scales = quantize_int8(weight)
        return QuantizedWeight("int8", q, scales)
    if method == "int4":
        group = group or int4_group_size(weight.shape[1])
        if group is None or weight.shape[1] % group:
            return None
        q, scales, zero_points = quantize_int4(weight, group)
        return QuantizedWeight("int4", q, scales, zero_points, group=group)
    if method == "fp8":
        q, scales = quantize_fp8(weight)
        return QuantizedWeight("fp8", q, scales)
    raise ValueError(f"quantization={method!r} is invalid: allowed {', '.join(QUANTIZATION_METHODS)}")


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The plain weight ``qw`` stands for (the reference every kernel is tested against)."""
    if qw.method == "int8":
        return dequantize_int8(qw.q, qw.scales.float(), dtype)
    if qw.method == "int4":
        assert qw.group is not None
        return dequantize_int4(qw.q, qw.scales, qw.zero_points, qw.group, dtype)
    if qw.block is not None:
        return dequantize_fp8_blocks(qw.q, qw.scales, qw.block).to(dtype)
    return (qw.q.float() * qw.scales.float()[:, None]).to(dtype)


def quantize_model(model: nn.Module, method: str, lm_head: bool | None = None) -> int:
    """Quantize every layer that can be (``quantize(method)``); returns how many.

    ``lm_head``: whether the logits' layer is quantized too (None: the method's default,
    ``LM_HEAD_QUANTIZED_BY_DEFAULT``). A model loaded from a checkpoint already quantized with
    ``method`` keeps its layers as they are, and only the head is quantized, if asked and not
    already; one quantized another way raises InvalidRequestError naming both."""
    if method not in QUANTIZATION_METHODS:
        allowed = ", ".join(QUANTIZATION_METHODS)
        raise ValueError(f"quantization={method!r} is invalid: allowed {allowed}, or none")
    if lm_head is None:
        lm_head = LM_HEAD_QUANTIZED_BY_DEFAULT[method]
    loaded = getattr(model, "checkpoint_quantization", None)
    if loaded is not None and loaded.method != method:
        raise InvalidRequestError(
            "quantization",
            method,
            f"{loaded.method} or none: the checkpoint is already quantized with {loaded.method} "
            f"({loaded.source})",
        )
    head = getattr(model, "lm_head", None)
    layers = [m for m in model.modules() if hasattr(m, "quantize") and m is not head and loaded is None]
    if lm_head and (head is None or getattr(head, "quantized", None) is None):
        layers.append(model.logits_layer())
    group = model_int4_group([m.weight.shape[1] for m in layers]) if method == "int4" else None
    return sum(bool(m.quantize(method, group)) for m in layers)


def model_int4_group(in_features: list[int]) -> int | None:
    """One int4 group size for a whole model, as a checkpoint's config states one: the smallest of the
    layers' own choices, which divides every layer that has one (32 | 64 | 128)."""
    groups = [g for n in in_features if (g := int4_group_size(n)) is not None]
    return min(groups) if groups else None
