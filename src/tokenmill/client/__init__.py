"""tokenmill's client SDK: talk to workers and gateways over the wire, never by importing them.

``GenerationClient`` (blocking) and ``AsyncGenerationClient`` (asyncio) speak a
worker's gRPC API; see ``tokenmill.client.grpc_client`` for an example.
``HTTPTransport`` is the asyncio HTTP/1.1 transport under everything that speaks
OpenAI's API (``tokenmill bench``, the SDK): pooled connections, streamed bodies,
server-sent events with arrival times; see ``tokenmill.client.http_transport``.
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
from tokenmill.client.http_errors import (
    ConnectError,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
)
from tokenmill.client.http_transport import HTTPTransport, Response, StreamingResponse
from tokenmill.client.sse import SSEDecoder, SSEEvent

__all__ = [
    "AsyncGenerationClient",
    "ChoiceDelta",
    "ConnectError",
    "DeadlineExceededError",
    "GenerateOptions",
    "GenerationChunk",
    "GenerationClient",
    "HTTPTransport",
    "Health",
    "ModelInfo",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "SSEDecoder",
    "SSEEvent",
    "StreamingResponse",
    "TokenLogprob",
    "TransportError",
    "Usage",
]
