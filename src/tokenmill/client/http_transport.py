"""A lean asyncio HTTP/1.1 client for OpenAI-compatible servers: pooled keep-alive connections,
streamed bodies and server-sent events stamped with their arrival time.

Example, with ``tokenmill serve`` on 127.0.0.1:8000::

    import asyncio
    import json

    from tokenmill.client import HTTPTransport


    async def main() -> None:
        async with HTTPTransport("http://127.0.0.1:8000") as http:
            print((await http.request("GET", "/v1/models")).json())
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16, "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                async for event in response.events():
                    if event.data != "[DONE]":
                        print(json.loads(event.data)["choices"][0]["delta"].get("content", ""), end="")
            print()


    asyncio.run(main())

It is what ``tokenmill bench`` and the SDK send through: its cost per streamed
message is a fifth of httpx's (see ``http_connection.py``), so one process can
drive a fleet without becoming the bottleneck it measures.

Errors: an HTTP error status is a response like any other (``response.status``).
A failed exchange raises a ``TransportError``: ``ConnectError`` (refused,
unknown host, connect timeout), ``ReadTimeout``, ``RemoteProtocolError`` (closed
mid-response, unparseable), ``PoolTimeout``. A request on a kept-alive
connection that the server had already closed is sent once more on a new one,
since the server cannot have seen it. Not supported: proxies, HTTP/2, redirects
(a 3xx is returned as is), ``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tokenmill.client.http_connection import HTTPConnection
from tokenmill.client.http_errors import ConnectError, PoolTimeout, RemoteProtocolError
from tokenmill.client.http_head import TOKEN, head_lines, header_dict, lowered
from tokenmill.client.sse import SSEDecoder, SSEEvent


def _version() -> str:
    from tokenmill import __version__

    return __version__


@dataclass(frozen=True)
class Response:
    """A whole response, read to its end."""

    status: int
    headers: dict[str, str]  # names lower-cased; repeated fields joined with ", "
    content: bytes
    sent: float  # time.perf_counter() when the request was written
    first_byte: float | None

    def json(self) -> Any:
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class StreamingResponse:
    """A response whose body is read as it arrives; valid inside ``HTTPTransport.stream``."""

    def __init__(self, connection: HTTPConnection, sent: float) -> None:
        self._connection = connection
        self.status = connection.status
        self.headers = header_dict(connection.headers)
        self.sent = sent
        self.first_byte = connection.first_byte

    async def aiter_bytes(self, coalesce: bool = False) -> AsyncIterator[tuple[bytes, float]]:
        """Body bytes as they arrive, each with its arrival time (``time.perf_counter()``).
        ``coalesce``: bytes that arrived while the reader was busy come joined, for a relay that
        pays per write."""
        read = self._connection.read_chunk
        while (item := await read(coalesce)) is not None:
            yield item

    async def read_chunk(self, coalesce: bool = False) -> tuple[bytes, float] | None:
        """``aiter_bytes``' next item, or None at the body's end: for a loop that reads every
        response, without an async generator's bookkeeping each time."""
        return await self._connection.read_chunk(coalesce)

    def abandon(self, reason: str) -> None:
        """Stop reading now: a read waiting for the server raises RemoteProtocolError(``reason``),
        and the connection closes (a tokenmill worker aborts the request when it sees that)."""
        self._connection.abandon(reason)

    async def events(self) -> AsyncIterator[SSEEvent]:
        """The body as server-sent events; ends when the body does.

        Raises ``RemoteProtocolError`` if the body ends inside an event."""
        decoder = SSEDecoder()
        read = self._connection.read_chunk
        while (item := await read()) is not None:
            for event in decoder.feed(item[0], item[1]):
                yield event
        if decoder.has_partial_event:
            raise RemoteProtocolError("the event stream ended inside an event")

    async def read(self) -> bytes:
        return b"".join([data async for data, _ in self.aiter_bytes()])


class Exchange:
    """``HTTPTransport.stream``'s block: the request is sent on entry, the connection given back on
    exit. (A class, not ``asynccontextmanager``: a router makes one per request, and the generator
    machinery cost more than the rest of the block.)"""

    __slots__ = ("_connection", "_request", "_transport")

    def __init__(self, transport: HTTPTransport, request: bytes) -> None:
        self._transport = transport
        self._request = request
        self._connection: HTTPConnection | None = None

    async def __aenter__(self) -> StreamingResponse:
        assert self._connection is None, "an exchange is entered once"
        connection, sent = await self._transport._exchange(self._request)
        self._connection = connection
        return StreamingResponse(connection, sent)

    async def __aexit__(self, *exc: object) -> None:
        connection = self._connection
        if connection is not None:
            connection.finish()
            self._transport._release(connection)


class HTTPTransport:
    """Requests to one server (``base_url``: scheme, host, port and an optional path prefix)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 256,
        connect_timeout: float = 10.0,
        read_timeout: float | None = 300.0,
        pool_timeout: float | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        """``read_timeout``: longest silence within a response (None: wait forever).
        ``pool_timeout``: longest wait for a free connection (None: wait forever)."""
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must look like http://host:port or https://host, got {base_url!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.base_url = base_url.rstrip("/")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._prefix = url.path.rstrip("/")
        self._ssl = _ssl_context(verify) if url.scheme == "https" else None
        default_port = self._port == (443 if url.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        authority = host if default_port else f"{host}:{self._port}"
        user_agent = f"tokenmill/{_version()}"
        self._default_headers = {"host": authority, "user-agent": user_agent, **lowered(headers)}
        self._default_head = head_lines(self._default_headers)
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_timeout = pool_timeout
        self._idle: list[HTTPConnection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request and read the whole response."""
        async with self.stream(method, path, json=json, content=content, headers=headers) as response:
            body = await response.read()
            return Response(response.status, response.headers, body, response.sent, response.first_byte)

    def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Exchange:
        """Send a request; the response's status and headers are in, its body is read inside the block
        (``async with transport.stream(...) as response``).

        Leaving the block before the body ends closes the connection, which is
        how a server learns that its client went away."""
        return Exchange(self, self._encode(method, path, json, content, headers))

    async def aclose(self) -> None:
        """Close idle connections now and busy ones as their responses end; later requests fail."""
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def __aenter__(self) -> HTTPTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def open_connections(self) -> int:
        return self._open

    # -- one exchange -----------------------------------------------------------------

    async def _exchange(self, request: bytes) -> tuple[HTTPConnection, float]:
        while True:
            connection, reused = await self._acquire()
            sent = time.perf_counter()
            try:
                connection.send(request)
                await connection.wait_headers()
                return connection, sent
            except RemoteProtocolError:
                connection.finish()
                self._release(connection)
                # A kept-alive connection the server closed while idle: the request never
                # reached it, so sending it again cannot run it twice.
                if reused and not connection.got_response_bytes:
                    continue
                raise
            except BaseException:
                connection.close()
                self._release(connection)
                raise

    def _encode(
        self, method: str, path: str, json: Any, content: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        if not TOKEN.match(method):
            raise ValueError(f"method must be an HTTP method name such as GET or POST, got {method!r}")
        if not path.startswith("/") or not path.isascii() or any(c in path for c in " \r\n"):
            raise ValueError(f"path must start with '/' and be URL-encoded ASCII, got {path!r}")
        if json is not None and content is not None:
            raise ValueError("pass json or content, not both")
        fields = self._default_head
        if headers:
            fields = head_lines({**self._default_headers, **lowered(headers)})
        head = [f"{method.upper()} {self._prefix}{path} HTTP/1.1\r\n", fields]
        body = b""
        if json is not None:
            text = jsonlib.dumps(json, separators=(",", ":"), ensure_ascii=False)
            try:
                body = text.encode()
            except UnicodeEncodeError:  # a lone surrogate: sent as JSON's escape, for the server to judge
                body = jsonlib.dumps(json, separators=(",", ":")).encode()
            if not (headers and any(name.lower() == "content-type" for name in headers)):
                head.append("content-type: application/json\r\n")
        elif content is not None:
            body = content
        if body or method.upper() in ("POST", "PUT", "PATCH"):
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        return "".join(head).encode("latin-1") + body

    # -- the pool ---------------------------------------------------------------------

    async def _acquire(self) -> tuple[HTTPConnection, bool]:
        loop = asyncio.get_running_loop()
        deadline = None if self._pool_timeout is None else loop.time() + self._pool_timeout
        while True:
            if self._closed:
                raise ConnectError(f"the transport to {self.base_url} is closed")
            while self._idle:
                connection = self._idle.pop()  # the most recently used: least likely closed by the server
                if not connection.closed:
                    return connection, True
                self._open -= 1
            if self._open < self._max_connections:
                self._open += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise PoolTimeout(
                    f"all {self._max_connections} connections to {self.base_url} stayed busy "
                    f"for {self._pool_timeout:g} s"
                ) from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: the free connection goes to the next in line
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    async def _connect(self) -> HTTPConnection:
        loop = asyncio.get_running_loop()
        read_timeout = self._read_timeout
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: HTTPConnection(read_timeout),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                self._connect_timeout,
            )
        except TimeoutError:
            raise ConnectError(f"no answer from {self.base_url} within {self._connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.base_url}: {e.strerror or e}") from None
        return connection

    def _release(self, connection: HTTPConnection) -> None:
        if connection.reusable and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _ssl_context(verify: bool | ssl.SSLContext) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
