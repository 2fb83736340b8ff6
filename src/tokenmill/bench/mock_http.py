"""The mock server's HTTP/1.1: one connection parsed with httptools, answered one request at a
time, and a writer for one response, whole or as a chunked event stream."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import httptools

if TYPE_CHECKING:
    from tokenmill.bench.mock_server import MockServer

logger = logging.getLogger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


class Responder:
    """Writes one response on a connection: whole, or as a chunked event stream."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.closed = False

    def json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = self._head(status, b"application/json") + b"content-length: %d\r\n\r\n" % len(body)
        self._connection.write(head + body)

    def error(self, status: int, message: str, param: str | None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def start_stream(self) -> None:
        self._connection.write(self._head(200, b"text/event-stream") + b"transfer-encoding: chunked\r\n\r\n")

    def event(self, payload: dict[str, Any]) -> None:
        self.event_raw(json.dumps(payload, separators=(",", ":")).encode())

    def event_raw(self, data: bytes) -> None:
        frame = b"data: " + data + b"\n\n"
        self._connection.write(b"%x\r\n%s\r\n" % (len(frame), frame))

    def end_stream(self) -> None:
        self._connection.write(b"0\r\n\r\n")

    def abort(self) -> None:
        self.closed = True
        self._connection.close()

    def _head(self, status: int, content_type: bytes) -> bytes:
        worker = self._connection.server.worker_id.encode()
        reason = _REASONS.get(status, "Unknown").encode()
        return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nx-tokenmill-worker: %s\r\n" % (
            status,
            reason,
            content_type,
            worker,
        )


class Connection(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them one at a time."""

    def __init__(self, server: MockServer) -> None:
        self.server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._authorization = ""
        self._queue: asyncio.Queue[tuple[str, str, bytes, str]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._responder: Responder | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._answer_in_order())

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.server.connections.discard(self)
        if self._responder is not None:
            self._responder.closed = True
        if self._worker is not None:
            self._worker.cancel()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._authorization = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        request = (method, self._url.decode("latin-1"), b"".join(self._body), self._authorization)
        self._queue.put_nowait(request)
        self._url, self._body, self._authorization = b"", [], ""

    async def _answer_in_order(self) -> None:
        handle: Callable[..., Any] = self.server.handle
        while True:
            method, path, body, authorization = await self._queue.get()
            self._responder = Responder(self)
            try:
                await handle(method, path, body, self._responder, authorization)
            except Exception:
                logger.exception("mock server failed on %s %s", method, path)
                self.close()
                return

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
