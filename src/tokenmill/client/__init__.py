"""tokenmill's client SDK: talk to workers and gateways over the wire, never by importing them.

``Client`` (blocking) and ``AsyncClient`` (asyncio) have OpenAI's surface
(``client.chat.completions.create(...)``) over a client-side queue that paces
requests to what the workers can take; see ``tokenmill.client.async_client``.
``GenerationClient`` (blocking) and ``AsyncGenerationClient`` (asyncio) speak a
worker's gRPC API; see ``tokenmill.client.grpc_client`` for an example.
``HTTPTransport`` is the asyncio HTTP/1.1 transport under everything that speaks
OpenAI's API (``tokenmill bench``, the SDK): pooled connections, streamed bodies,
server-sent events with arrival times; see ``tokenmill.client.http_transport``.
"""

from tokenmill.client.adaptive import AdaptiveLimit, LimitSettings
from tokenmill.client.async_client import AsyncClient, AsyncStream
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
from tokenmill.client.http_errors import (
    ConnectError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
)
from tokenmill.client.http_transport import HTTPTransport, Response, StreamingResponse
from tokenmill.client.monitor import MonitorReport, TargetSummary
from tokenmill.client.openai_types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    CompletionUsage,
)
from tokenmill.client.sse import SSEDecoder, SSEEvent
from tokenmill.client.sync_client import Client, Stream
from tokenmill.protocol.errors import APIError

__all__ = [
    "APIError",
    "AdaptiveLimit",
    "AsyncClient",
    "AsyncGenerationClient",
    "AsyncStream",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChoiceDelta",
    "Client",
    "Completion",
    "CompletionChunk",
    "CompletionUsage",
    "ConnectError",
    "DeadlineExceededError",
    "GenerateOptions",
    "GenerationChunk",
    "GenerationClient",
    "HTTPTransport",
    "Health",
    "LimitSettings",
    "ModelInfo",
    "MonitorReport",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "SSEDecoder",
    "SSEEvent",
    "Stream",
    "StreamingResponse",
    "TargetSummary",
    "TokenLogprob",
    "TransportError",
    "Usage",
]
