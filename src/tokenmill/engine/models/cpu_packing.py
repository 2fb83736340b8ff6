"""oneDNN-packed weights for bf16 linear layers on CPU.

PyTorch's ``F.linear`` on CPU re-lays the weight out for oneDNN on every call.
Packing each weight once into oneDNN's blocked layout (the op inductor's CPU
path uses) made the 125M benchmark model's matmuls 1.2-1.7x faster at every
batch size measured (1 to 2048 rows), with identical results. A packed weight
is opaque (no indexing, no safetensors), so packing is the last step of
preparing a model, and a snapshot stores the plain weights.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Rows per call oneDNN tunes the layout for: decode batches are tens of rows,
# and this hint measured best across 1-2048 rows.
BATCH_HINT = 64


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and _packing_works()


@functools.cache
def _packing_works() -> bool:
    """Whether this build and CPU pack bf16 weights: oneDNN's bf16 path needs AVX-512 (BW, VL, DQ)
    or AVX-NE-CONVERT, so on an AVX2 CPU it refuses every weight (tokenmill's half_gemv serves
    decode there instead, see layers.linear)."""
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(
            torch.zeros(16, 16, dtype=torch.bfloat16), BATCH_HINT
        )
        packed_linear(torch.zeros(2, 16, dtype=torch.bfloat16), packed, None)
    except RuntimeError as e:
        logger.info("bf16 weights stay unpacked: oneDNN cannot pack them here (%s)", e)
        return False
    return True


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None if this build cannot pack it."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
        probe = torch.zeros(2, weight.shape[1], dtype=weight.dtype)
        packed_linear(probe, packed, None)  # fail here, not in the first step
        return packed
    except (RuntimeError, AttributeError) as e:
        logger.warning("cannot pack a %s weight for oneDNN (%s); using F.linear", tuple(weight.shape), e)
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def pack_linear_layers(model: nn.Module) -> int:
    """Pack every layer that has a ``pack()`` method; returns how many were packed."""
    return sum(bool(m.pack()) for m in model.modules() if hasattr(m, "pack"))
