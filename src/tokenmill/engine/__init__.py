"""tokenmill's engine: one model on one device.

Imports only torch, tokenizers, safetensors, jinja2 and numpy, so it runs on a
bare GPU box without the web stack.
"""

from tokenmill.engine.config import EngineConfig, ModelConfig
from tokenmill.engine.engine import Engine, EngineStats
from tokenmill.engine.errors import (
    EngineError,
    InsufficientKVCacheError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from tokenmill.engine.llm import LLM
from tokenmill.engine.memory import KVCachePlan
from tokenmill.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.engine.sampling_params import OutputKind, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "InsufficientKVCacheError",
    "InvalidRequestError",
    "KVCachePlan",
    "ModelConfig",
    "ModelLoadError",
    "OutputKind",
    "PromptTooLongError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "UnsupportedArchitectureError",
]
