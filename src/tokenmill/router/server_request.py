"""One request on a client connection of the router's HTTP/1.1 server
(``router/server_connection.py``): its ASGI ``receive`` and ``send``, and its answer's framing."""

from __future__ import annotations

import asyncio
import email.utils
import http
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.router.server_connection import ServerConnection

REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
NO_BODY = (204, 304)


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second = second
            cls.value = email.utils.formatdate(second, usegmt=True).encode()
        return cls.value


class Request:
    """One request of a connection: its head and body as parsed, and its answer's ASGI ``receive``
    and ``send`` (framing the answer, waiting while the client's socket buffer is full)."""

    __slots__ = (
        "body", "body_read", "chunked", "connection", "finished", "head", "head_at", "head_read", "headers",
        "http_version", "keep_alive", "method", "size", "started", "task", "url", "waiter",
    )  # fmt: skip

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self.url = b""
        self.head_at = connection.reads  # the read its head began in; 0 once the head is complete
        self.head_read = 0  # bytes of later reads that were all head (data_received)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0  # body bytes received
        self.method = "GET"
        self.http_version = "1.1"
        self.keep_alive = True
        self.body_read = False
        self.started = False
        self.finished = False
        self.chunked = False
        self.head: bytes | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        if not self.body_read:
            self.body_read = True
            body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
            self.body = []
            return {"type": "http.request", "body": body, "more_body": False}
        # The body was read: what comes now is the client leaving (or the response ending).
        if not self.connection.closed and not self.finished:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        connection = self.connection
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.head = self._head(message["status"], message.get("headers") or [])
            return
        if kind != "http.response.body" or not self.started or self.finished:
            raise RuntimeError(f"unexpected ASGI message {kind!r} at this point of the response")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.method == "HEAD":
            body = b""
        elif self.chunked:
            body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + (b"" if more else b"0\r\n\r\n")
        if self.head is not None:
            body, self.head = self.head + body, None
        if connection.closed:
            self.finished = not more
            return  # the client left: nothing to write to (the app learns it from receive())
        if body:
            connection._write(body)
        if not more:
            self.finished = True
            self.wake()
            connection.response_done(self)
        elif connection.drain is not None:
            await connection.drain  # a slow client: wait for its socket buffer to drain

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"")), b"date: ", _Date.now(), b"\r\n"]
        length = close = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = True
            elif lowered == b"transfer-encoding":
                length = True  # the app frames its body itself
            elif lowered == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                close = True
            lines += (name, b": ", value, b"\r\n")
        if not length and status not in NO_BODY and self.method != "HEAD":
            self.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive and not close:
            lines.append(b"connection: close\r\n")
        elif self.http_version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)
