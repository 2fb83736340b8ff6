"""tokenmill's engine: one model on one device.

Imports only torch, tokenizers, safetensors, jinja2 and numpy, so it runs on a
bare GPU box without the web stack.
"""

from tokenmill.engine.async_engine import AsyncEngine, EngineListener, RequestStream
from tokenmill.engine.block_hash import hash_blocks
from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.engine import Engine
from tokenmill.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    InsufficientKVCacheError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from tokenmill.engine.kv_events import AllCleared, BlockRemoved, BlockStored, CachedBlocks, KVEventBatch
from tokenmill.engine.llm import LLM
from tokenmill.engine.memory import KVCachePlan
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.engine.stats import EngineStats, StepRecord
from tokenmill.engine.timing import TimingModel

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
    "UnsupportedArchitectureError",
    "hash_blocks",
]
