"""Attention backends, chosen by name."""

from __future__ import annotations

from tokenmill.engine.attention.backend import (
    AttentionBackend,
    AttentionBatch,
    AttentionContext,
    AttentionSpec,
)
from tokenmill.engine.attention.cpu import CpuBackend
from tokenmill.engine.attention.kv_cache import Fp8KVCache, KVCache
from tokenmill.engine.attention.reference import ReferenceBackend
from tokenmill.engine.errors import InvalidRequestError

BACKENDS: dict[str, type[AttentionBackend]] = {"cpu": CpuBackend, "reference": ReferenceBackend}


def get_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    """``auto``: the CPU kernel where it serves the spec (a CPU model, a plain cache, kernels built),
    else the reference backend."""
    if name == "auto":
        name = "cpu" if CpuBackend.unavailable_reason(spec) is None else "reference"
    if name not in BACKENDS:
        raise InvalidRequestError("attention_backend", name, "one of auto, " + ", ".join(BACKENDS))
    return BACKENDS[name](spec)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionBatch",
    "AttentionContext",
    "AttentionSpec",
    "CpuBackend",
    "Fp8KVCache",
    "KVCache",
    "ReferenceBackend",
    "get_backend",
]
