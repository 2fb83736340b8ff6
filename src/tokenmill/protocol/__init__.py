"""What crosses the wire: OpenAI request and response models, the gRPC proto, API errors, header names.

Imports nothing of tokenmill, so the router, the client SDK and the server all
speak the same protocol without depending on each other.
"""

from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import PRIORITY_HEADER, TENANT_HEADER, WORKER_HEADER, parse_priority

__all__ = ["PRIORITY_HEADER", "TENANT_HEADER", "WORKER_HEADER", "APIError", "parse_priority"]
