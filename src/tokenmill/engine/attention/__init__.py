"""Attention backends, chosen by name."""

from __future__ import annotations

from tokenmill.engine.attention.backend import (
    AttentionBackend,
    AttentionBatch,
    AttentionContext,
    AttentionSpec,
)
from tokenmill.engine.attention.kv_cache import Fp8KVCache, KVCache
from tokenmill.engine.attention.reference import ReferenceBackend
from tokenmill.engine.errors import InvalidRequestError

BACKENDS: dict[str, type[AttentionBackend]] = {"reference": ReferenceBackend}


def get_backend(name: str, spec: AttentionSpec) -> AttentionBackend:
    if name == "auto":
        name = "reference"
    if name not in BACKENDS:
        raise InvalidRequestError("attention_backend", name, "one of auto, " + ", ".join(BACKENDS))
    return BACKENDS[name](spec)


__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionBatch",
    "AttentionContext",
    "AttentionSpec",
    "Fp8KVCache",
    "KVCache",
    "ReferenceBackend",
    "get_backend",
]
