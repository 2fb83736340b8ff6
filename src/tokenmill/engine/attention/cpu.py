"""The CPU backend: decodes through tokenmill's paged decode kernel, prefills as the reference backend.

The reference backend's decode gathers each context's K and V out of their
blocks, pads them into buckets and calls SDPA: about ten ops and two copies of
the context a layer. On the 125M benchmark model at batch 1 that was ~180 us a
layer, 2.2 ms of an 11.7 ms int8 decode step (2-core AVX2 EPYC), for a few
hundred 64-wide dot products. ``native/paged_attention.cpp`` stores the step's
K/V and attends in one op, reading the context in place from its blocks.
Prefills keep the reference backend's batched SDPA, where arithmetic, not
calls, is the cost. The cache layout is the reference one, so both backends
hold the same bytes; fp8 caches stay on the reference backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine import native
from tokenmill.engine.attention.backend import AttentionBackend, AttentionBatch, AttentionSpec
from tokenmill.engine.attention.kv_cache import KVCache
from tokenmill.engine.attention.reference import PrefillGroup, ReferenceBackend
from tokenmill.engine.errors import InvalidRequestError


@dataclass
class CpuMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]: every new token's slot, decodes first
    num_decodes: int
    decode_blocks: torch.Tensor  # [num_decodes, max_blocks] the decodes' block tables
    decode_lens: torch.Tensor  # [num_decodes] int64: context + this step's token
    prefills: list[PrefillGroup]


class CpuBackend(AttentionBackend):
    name = "cpu"

    @staticmethod
    def unavailable_reason(spec: AttentionSpec) -> str | None:
        """Why this backend cannot serve ``spec`` here, or None if it can."""
        if spec.device.type != "cpu":
            return f"it runs on CPU, and the model is on {spec.device}"
        if spec.kv_cache_dtype != "auto":
            return f"kv_cache_dtype={spec.kv_cache_dtype!r} caches are read by the reference backend"
        if spec.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"it computes in float32, bfloat16 or float16, not {spec.dtype}"
        return native.unavailable_reason()

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        reason = self.unavailable_reason(spec)
        kernel = native.paged_decode_attention()
        if reason is not None or kernel is None:
            raise InvalidRequestError(
                "attention_backend",
                "cpu",
                "auto or reference",
                message=f"attention_backend='cpu' cannot run here: {reason}; use 'auto' or 'reference'",
            )
        self.kernel = kernel
        self.reference = ReferenceBackend(spec)
        self.store = self.reference.store  # the reference layout: both backends hold the same bytes
        self.window = spec.sliding_window or 0  # the kernel's 0: no window

    def allocate_kv_cache(self, num_layers: int, num_blocks: int) -> list[KVCache]:
        return self.reference.allocate_kv_cache(num_layers, num_blocks)

    def prepare(self, batch: AttentionBatch) -> CpuMetadata:
        nd = batch.num_decodes
        return CpuMetadata(
            slot_mapping=batch.slot_mapping,
            num_decodes=nd,
            decode_blocks=batch.block_table[:nd],
            decode_lens=torch.tensor(batch.seq_lens[:nd], dtype=torch.long),
            prefills=self.reference.prefill_groups(batch),
        )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: CpuMetadata
    ) -> torch.Tensor:
        assert isinstance(kv_cache, torch.Tensor)  # unavailable_reason keeps fp8 caches away
        nd, n = meta.num_decodes, meta.slot_mapping.shape[0]
        spec = self.spec
        if nd == n == q.shape[0]:  # decodes only, unpadded: the kernel's output is the answer
            return self.kernel(
                q, k, v, kv_cache, meta.slot_mapping, meta.decode_blocks, meta.decode_lens,
                spec.block_size, spec.scale, self.window,
            )  # fmt: skip
        out = torch.empty_like(q)
        out[n:] = 0  # the runner's padding rows
        # The prefills' K/V are stored first: the decodes' rows are written by the kernel.
        self.store.write(kv_cache, meta.slot_mapping[nd:n], k[nd:n], v[nd:n])
        if nd:
            out[:nd] = self.kernel(
                q[:nd], k[:nd], v[:nd], kv_cache, meta.slot_mapping[:nd], meta.decode_blocks,
                meta.decode_lens, spec.block_size, spec.scale, self.window,
            )  # fmt: skip
        # A plain store hands back the K/V it was given: the prefills attend to k and v as they are.
        self.reference.attend_prefills(q, k, v, kv_cache, meta.prefills, out)
        return out
