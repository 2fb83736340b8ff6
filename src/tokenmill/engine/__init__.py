"""tokenmill's engine: one model on one device.

Imports only torch, tokenizers, safetensors, jinja2 and numpy, so it runs on a
bare GPU box without the web stack. Names load on first use: importing a
torch-free part (``tokenmill.engine.tokenizer``, ``tokenmill.engine.block_hash``,
which a KV-aware router needs to name a prompt's blocks as a worker does) does
not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine, EngineListener
    from tokenmill.engine.block_hash import hash_blocks
    from tokenmill.engine.config import EngineConfig, ModelConfig
    from tokenmill.engine.engine import Engine
    from tokenmill.engine.errors import (
        EngineDeadError,
        EngineError,
        EngineOverloadedError,
        InsufficientKVCacheError,
        InvalidRequestError,
        MaxTokensTooLargeError,
        ModelLoadError,
        PromptTooLongError,
        UnsupportedArchitectureError,
    )
    from tokenmill.engine.input_processor import TokenizedPrompt
    from tokenmill.engine.kv_events import AllCleared, BlockRemoved, BlockStored, CachedBlocks, KVEventBatch
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.memory import KVCachePlan
    from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
    from tokenmill.engine.request_stream import RequestStream
    from tokenmill.engine.sampling_params import OutputKind, SamplingParams
    from tokenmill.engine.stats import EngineStats, StepRecord
    from tokenmill.engine.timing import TimingModel

_WHERE = {
    "AllCleared": "tokenmill.engine.kv_events",
    "AsyncEngine": "tokenmill.engine.async_engine",
    "BlockRemoved": "tokenmill.engine.kv_events",
    "BlockStored": "tokenmill.engine.kv_events",
    "CachedBlocks": "tokenmill.engine.kv_events",
    "CompletionOutput": "tokenmill.engine.outputs",
    "Engine": "tokenmill.engine.engine",
    "EngineConfig": "tokenmill.engine.config",
    "EngineDeadError": "tokenmill.engine.errors",
    "EngineError": "tokenmill.engine.errors",
    "EngineListener": "tokenmill.engine.async_engine",
    "EngineOverloadedError": "tokenmill.engine.errors",
    "EngineStats": "tokenmill.engine.stats",
    "InsufficientKVCacheError": "tokenmill.engine.errors",
    "InvalidRequestError": "tokenmill.engine.errors",
    "KVCachePlan": "tokenmill.engine.memory",
    "KVEventBatch": "tokenmill.engine.kv_events",
    "LLM": "tokenmill.engine.llm",
    "MaxTokensTooLargeError": "tokenmill.engine.errors",
    "ModelConfig": "tokenmill.engine.config",
    "ModelLoadError": "tokenmill.engine.errors",
    "OutputKind": "tokenmill.engine.sampling_params",
    "PromptTooLongError": "tokenmill.engine.errors",
    "RequestMetrics": "tokenmill.engine.outputs",
    "RequestOutput": "tokenmill.engine.outputs",
    "RequestStream": "tokenmill.engine.request_stream",
    "SamplingParams": "tokenmill.engine.sampling_params",
    "StepRecord": "tokenmill.engine.stats",
    "TimingModel": "tokenmill.engine.timing",
    "TokenLogprob": "tokenmill.engine.outputs",
    "TokenizedPrompt": "tokenmill.engine.input_processor",
    "UnsupportedArchitectureError": "tokenmill.engine.errors",
    "hash_blocks": "tokenmill.engine.block_hash",
}

__all__ = [
    "LLM",
    "AllCleared",
    "AsyncEngine",
    "BlockRemoved",
    "BlockStored",
    "CachedBlocks",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineError",
    "EngineListener",
    "EngineOverloadedError",
    "EngineStats",
    "InsufficientKVCacheError",
    "InvalidRequestError",
    "KVCachePlan",
    "KVEventBatch",
    "MaxTokensTooLargeError",
    "ModelConfig",
    "ModelLoadError",
    "OutputKind",
    "PromptTooLongError",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
    "StepRecord",
    "TimingModel",
    "TokenLogprob",
    "TokenizedPrompt",
    "UnsupportedArchitectureError",
    "hash_blocks",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
