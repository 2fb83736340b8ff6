"""The attention backend interface.

A backend owns the layout of the KV cache and the attention kernel. The runner
describes each step once, backend-independently, as an ``AttentionBatch``; the
backend turns it into whatever metadata its kernel wants (``prepare``), and
each layer then calls ``forward`` through the ``AttentionContext``. A new
kernel is one new file implementing ``AttentionBackend``.

Requests in a batch are ordered decodes first: the first ``num_decodes``
requests have exactly one query token each.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tokenmill.engine.attention.kv_cache import KVCache


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    sliding_window: int | None = None
    kv_cache_dtype: str = "auto"  # auto: K/V stored in ``dtype``; fp8: e4m3 with scales (kv_cache.py)

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


@dataclass(frozen=True)
class AttentionBatch:
    """Where each request's queries are and what context they attend to."""

    num_decodes: int  # the first requests, one query token each
    query_start_loc: list[int]  # len = num_requests + 1; offsets into the flat token axis
    context_lens: list[int]  # tokens already in the KV cache before this step
    seq_lens: list[int]  # context + this step's tokens
    block_table: torch.Tensor  # [num_requests, max_blocks] int64, padded with the null block
    # [num_tokens] int64: cache slot each new token's K/V goes to. The runner may pad the
    # step's token axis past num_tokens; backends write and attend only the first num_tokens
    # rows and leave the padding rows of their output zero.
    slot_mapping: torch.Tensor

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(ABC):
    name: str = ""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    @abstractmethod
    def allocate_kv_cache(self, num_layers: int, num_blocks: int) -> list[KVCache]:
        """One cache per layer: a tensor, or an ``Fp8KVCache`` for ``kv_cache_dtype="fp8"``.
        The null block (block 0) must be zeroed; other slots may hold garbage until
        written, so kernels must never read a slot at or past a sequence's length
        without masking the load itself."""

    @abstractmethod
    def prepare(self, batch: AttentionBatch) -> Any:
        """Per-step metadata, computed once and shared by every layer."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, meta: Any
    ) -> torch.Tensor:
        """Store k/v for this step's tokens, then attend. q: [T, H, D]; k, v: [T, KV, D].
        Returns [T, H, D]."""


class AttentionContext:
    """What a model's attention layers need for one step, passed down explicitly."""

    def __init__(self, backend: AttentionBackend, kv_caches: list[KVCache], meta: Any):
        self.backend = backend
        self.kv_caches = kv_caches
        self.meta = meta

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_caches[layer_idx], self.meta)
