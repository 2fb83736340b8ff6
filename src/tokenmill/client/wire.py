"""How one request travels: OpenAI's HTTP API, or a tokenmill worker's gRPC ``Generate``.

Both give the dispatcher the same thing: the worker that answered, then the
response as OpenAI-shaped JSON objects (one whole body, or one chunk per
streamed message), each stamped with its arrival time. Failures raise
``APIError`` (the server's status and fields) or a ``TransportError``; a
server's refusal raises from the first read, once its worker is known.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.client.http_errors import RemoteProtocolError
from tokenmill.client.http_transport import HTTPTransport, StreamingResponse
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import WORKER_HEADER


@dataclass(frozen=True, slots=True)
class Message:
    data: dict[str, Any]
    time: float  # time.perf_counter() at arrival


class Exchange(Protocol):
    worker: str | None  # who answered, a refusal too; None: no answer came (the first read raises why)

    def messages(self) -> AsyncIterator[Message]: ...


class Wire(Protocol):
    def open(self, path: str, body: dict[str, Any], stream: bool, headers: Mapping[str, str]) -> Any:
        """An async context manager yielding an ``Exchange``."""
        ...

    async def aclose(self) -> None: ...


class HTTPWire:
    def __init__(self, url: str, headers: Mapping[str, str], timeout: float | None):
        self.url = url
        self._transport = HTTPTransport(url, headers=headers, max_connections=4096, read_timeout=timeout)

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, body: dict[str, Any], stream: bool, headers: Mapping[str, str]
    ) -> AsyncIterator[HTTPExchange]:
        async with self._transport.stream("POST", path, json=body, headers=headers) as response:
            # A refusal is an answer too: its worker is known, and the first read raises the error,
            # so a failed request counts under the worker that refused it.
            yield HTTPExchange(response, stream, response.headers.get(WORKER_HEADER) or self.url)

    async def aclose(self) -> None:
        await self._transport.aclose()


class HTTPExchange:
    def __init__(self, response: StreamingResponse, stream: bool, worker: str):
        self._response = response
        self._stream = stream
        self.worker = worker

    async def messages(self) -> AsyncIterator[Message]:
        response = self._response
        if response.status >= 400:
            raise status_error(response.status, await response.read(), response.headers)
        if not self._stream:
            body = await self._response.read()
            yield Message(parse_json(body), time.perf_counter())
            return
        async for event in self._response.events():
            if event.data == "[DONE]":
                return
            data = parse_json(event.data.encode())
            if "error" in data:  # an error after the stream started travels inline
                raise APIError.from_body(500, data)
            yield Message(data, event.time)
        raise RemoteProtocolError("the event stream ended before data: [DONE]")


def status_error(status: int, body: bytes, headers: Mapping[str, str]) -> APIError:
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body.decode("utf-8", "replace")
    error = APIError.from_body(status, parsed)
    retry_after = headers.get("retry-after")
    if retry_after:
        with contextlib.suppress(ValueError):  # an HTTP date: the backoff decides instead
            error.retry_after = max(0.0, float(retry_after))
    return error


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise APIError(502, f"the server sent a body that is not JSON: {raw[:200]!r}", "api_error") from None
    if not isinstance(data, dict):
        raise APIError(502, f"the server sent JSON that is not an object: {raw[:200]!r}", "api_error")
    return data
