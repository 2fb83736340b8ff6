"""tokenmill's client SDK: talk to workers and gateways over the wire, never by importing them.

``GenerationClient`` (blocking) and ``AsyncGenerationClient`` (asyncio) speak a
worker's gRPC API; see ``tokenmill.client.grpc_client`` for an example.
"""

from tokenmill.client.grpc_client import AsyncGenerationClient, DeadlineExceededError, GenerationClient
from tokenmill.client.grpc_messages import (
    ChoiceDelta,
    GenerateOptions,
    GenerationChunk,
    Health,
    ModelInfo,
    TokenLogprob,
    Usage,
)

__all__ = [
    "AsyncGenerationClient",
    "ChoiceDelta",
    "DeadlineExceededError",
    "GenerateOptions",
    "GenerationChunk",
    "GenerationClient",
    "Health",
    "ModelInfo",
    "TokenLogprob",
    "Usage",
]
