"""How a layer's K and V sit in the paged cache: as the model computes them, or in float8.

A slot (block * block_size + offset) holds one token's K and V for every KV head.
``PlainKVStore`` keeps them in the compute dtype, in one tensor per layer:
``[2, num_slots, kv_heads, head_dim]``. ``Fp8KVStore`` (``kv_cache_dtype="fp8"``)
keeps them in float8 e4m3 with one float32 scale per (slot, KV head), in an
``Fp8KVCache`` per layer, and dequantizes on every read.

Scale scheme, and why: each (token, KV head) row of K or V gets
``scale = amax(|row|) / 448`` when the step writes it (448 is e4m3's largest
finite value), so the row's largest element lands on the top code: rounding
moves an element by at most 2^-4 of itself (e4m3's half step; 2^-10 of the
scale below e4m3's normal range), never by more than 2^-4 of the row's amax.
The scale is computed from the row alone, once, at write time: no calibration
pass, no rescaling of slots already written, and a slot's bytes never change
while prefix caching shares it. Per-tensor scales (vLLM's default, 1.0
without calibration) clip outliers or waste the range of the small heads;
per-channel scales (KIVI) suit K better but have to be fixed before the
tokens they cover are known. The cost is 4 bytes per head_dim bytes of codes:
6% at head_dim 64, 3% at 128, so a pool holds 1.88x to 1.94x the tokens it
holds in bf16.

Every attention of a step sees K/V exactly as they come back from the cache,
including a prefill's attention over its own fresh K/V (``write`` returns them
dequantized): a prompt computes the same whether its prefix came from the
prefix cache, an earlier chunk or this step, as vLLM's kernels that attend
over the paged cache do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.attention.backend import AttentionSpec
from tokenmill.engine.errors import InvalidRequestError

FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# An all-zero row must not divide by zero; any scale this small also keeps
# ``scale * _CODE_TO_BF16`` a normal number in dequantize_kv.
MIN_SCALE = 2.0**-126
# dequantize_kv multiplies by scale * 2^120, which must stay below float32's and
# bf16's 2^128: rows past 448 * 2^7 = 57344 saturate there instead of overflowing.
# K and V of real models stay orders of magnitude below.
MAX_SCALE = 2.0**7

# A float8 e4m3 code's 7 bits of exponent and mantissa moved to bits 4-10 of a
# bf16, with its sign at bit 15, read as a bf16 (the exponent biases are 7 and
# 127), are the code's value times 2^-120, exactly, subnormals and zeros included.
_CODE_TO_BF16 = 2.0**120
_BF16_BITS_MASK = 0x87F0 - 0x10000  # as int16: the sign bit and bits 4-10


@dataclass(frozen=True)
class Fp8KVCache:
    """One layer's K and V in float8 e4m3: ``data * scales[..., None]`` is the value."""

    data: torch.Tensor  # [2, num_slots, kv_heads, head_dim] float8_e4m3fn
    scales: torch.Tensor  # [2, num_slots, kv_heads] float32


KVCache = torch.Tensor | Fp8KVCache  # one layer's cache, as a KV store allocates it


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``: [T, KV, D] -> (codes [T, KV, D] float8 e4m3, scales [T, KV] float32)."""
    x = x.float()
    scales = (x.abs().amax(dim=-1) / FP8_MAX).clamp_(MIN_SCALE, MAX_SCALE)
    # The clamp keeps rows past MAX_SCALE saturated whatever the cast does with out-of-range values.
    codes = (x / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_kv``: [T, KV, D] in ``dtype``.

    PyTorch casts float8 on CPU with a scalar loop (~3 ns an element, 50x a bf16
    gather), and a decode step reads every context token of every layer. So the
    codes are decoded by moving their bits into a bf16 (see ``_CODE_TO_BF16``):
    three integer passes and one multiply, ~0.3 ns an element, with the 2^120
    folded into the scale. In bf16 the result is within 2^-8 relative of the
    exact product (the rounded scale, the rounded product), far inside e4m3's 2^-4.
    """
    bits = codes.view(torch.int8).to(torch.int16)  # sign-extended: a negative code is 0xFF80 | magnitude
    bits.bitwise_left_shift_(4).bitwise_and_(_BF16_BITS_MASK)
    unscaled = bits.view(torch.bfloat16)
    factor = (scales * _CODE_TO_BF16).unsqueeze(-1)
    if dtype == torch.bfloat16:
        return unscaled.mul_(factor.to(torch.bfloat16))
    return (unscaled.to(torch.float32) * factor).to(dtype)


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, spec: AttentionSpec) -> torch.Tensor:
    """A zeroed null block (block 0: padding reads it, and 0 * garbage could be NaN); the rest
    zeroed on CPU too, so every page is touched now, in one sequential pass: left to fault in
    block by block as requests first write them, the pool ended up on small pages and decode
    steps ran 1.6x slower until the whole pool had been written once."""
    try:
        if spec.device.type == "cpu":
            return torch.zeros(shape, dtype=dtype, device=spec.device)
        cache = torch.empty(shape, dtype=dtype, device=spec.device)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError | torch.OutOfMemoryError) and "alloc" not in str(e):
            raise
        # Not a traceback at start-up: the pool's size is the user's kv_cache_memory.
        nbytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        raise InvalidRequestError(
            "kv_cache_memory",
            None,
            "bytes the device can allocate",
            message=f"cannot allocate the KV cache on {spec.device}: one layer's {nbytes / 2**30:.2f} GiB "
            f"failed ({str(e).splitlines()[0][:200]}); lower kv_cache_memory (bytes, or a fraction of "
            "the free memory)",
        ) from None
    cache[:, : spec.block_size].zero_()
    return cache


class PlainKVStore:
    """K and V in the compute dtype: ``[2, num_slots, kv_heads, head_dim]`` per layer."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def allocate(self, num_layers: int, num_blocks: int) -> list[KVCache]:
        s = self.spec
        shape = (2, num_blocks * s.block_size, s.num_kv_heads, s.head_dim)
        return [_allocate(shape, s.dtype, s) for _ in range(num_layers)]

    def write(
        self, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's K/V ([T, KV, D]) at ``slots``; returns them as a read would see them."""
        cache[0].index_copy_(0, slots, k)
        cache[1].index_copy_(0, slots, v)
        return k, v

    def gather(self, cache: torch.Tensor, which: int, slots: torch.Tensor) -> torch.Tensor:
        """K (``which`` 0) or V (1) of ``slots``: [len(slots), KV, D] in the compute dtype."""
        # index_select on a flat index is ~8x faster than advanced indexing on CPU.
        return cache[which].index_select(0, slots)


class Fp8KVStore:
    """K and V in float8 e4m3 with a float32 scale per (slot, KV head): an ``Fp8KVCache`` per layer."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def allocate(self, num_layers: int, num_blocks: int) -> list[KVCache]:
        s = self.spec
        slots = num_blocks * s.block_size
        return [
            Fp8KVCache(
                _allocate((2, slots, s.num_kv_heads, s.head_dim), FP8_DTYPE, s),
                _allocate((2, slots, s.num_kv_heads), SCALE_DTYPE, s),
            )
            for _ in range(num_layers)
        ]

    def write(
        self, cache: Fp8KVCache, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        for which, x in enumerate((k, v)):
            codes, scales = quantize_kv(x)
            # index_copy_ has no float8 kernel on CPU: copy the bytes.
            cache.data[which].view(torch.uint8).index_copy_(0, slots, codes.view(torch.uint8))
            cache.scales[which].index_copy_(0, slots, scales)
            seen.append(dequantize_kv(codes, scales, self.spec.dtype))
        return seen[0], seen[1]

    def gather(self, cache: Fp8KVCache, which: int, slots: torch.Tensor) -> torch.Tensor:
        codes = cache.data[which].index_select(0, slots)
        return dequantize_kv(codes, cache.scales[which].index_select(0, slots), self.spec.dtype)


KVStore = PlainKVStore | Fp8KVStore


def make_kv_store(spec: AttentionSpec) -> KVStore:
    return Fp8KVStore(spec) if spec.kv_cache_dtype == "fp8" else PlainKVStore(spec)
