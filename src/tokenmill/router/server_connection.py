"""One client connection of the router's HTTP/1.1 server (``router/http_server.py``): requests
parsed by httptools, handed to the ASGI app one at a time, and their answers framed and written.

A client that leaves mid-request: an app waiting in ``receive()`` gets ``http.disconnect``, as
ASGI has it; an app waiting on anything else (the router, on a worker's whole answer) has its
task cancelled, since nobody will read what it waits for (for the router, closing the worker's
connection aborts the request there, and the gateway records it as cancelled).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from tokenmill.router.server_request import REASONS, Request

if TYPE_CHECKING:
    from tokenmill.router.http_server import HTTPServer

logger = logging.getLogger(__name__)

_PIPELINE_DEPTH = 8  # parsed requests a connection holds before it stops reading
MAX_BODY_BYTES = 64 << 20  # a request body past this is refused (413) before it fills memory
MAX_HEAD_BYTES = 64 << 10  # request line and headers past this are refused (431), as nginx's and uvicorn's


class ServerConnection(asyncio.Protocol):
    """One client's connection: its requests parsed, answered in order through the app."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Request | None = None
        self.current: Request | None = None  # the request being answered
        self.pending: deque[Request] = deque()  # parsed, waiting their turn
        self.closed = False
        self.closing = False  # close once the current response ends
        self.reading_paused = False
        self.drain: asyncio.Future[None] | None = None  # set while the socket buffer is full
        self.last_active = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.reads = 0  # data_received calls, so the timer can tell a request that stopped arriving
        self.reads_at_timer = 0
        # The drain waited on when the timer last fired: the same one still waited on at the next
        # is a client that read nothing of its answer for a whole interval.
        self.drain_at_timer: asyncio.Future[None] | None = None
        # The request whose head was still arriving when the timer last fired: still the one at the
        # next is a head trickled in for a whole interval (a byte at a time resets nothing).
        self.head_at_timer: Request | None = None
        # A refusal (413, 431, 400) of a pipelined request that came while an answer ran: sent once
        # that answer, and those of the requests parsed before it, have ended; nothing more is read.
        self.refusal: bytes | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.client = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self._arm_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        current = self.current
        if current is not None and not current.finished and current.task is not None:
            listening = current.waiter is not None and not current.waiter.done()
            if not listening and not current.task.done():
                current.task.cancel()
        for request in (current, *self.pending):
            if request is not None:
                request.wake()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if self.refusal is not None:  # (the parser is stopped mid-request: nothing after it is read)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades here (WebSockets, h2c): the request is answered as plain HTTP, and as the
            # bytes after it belong to the other protocol, the connection ends with that answer.
            self.closing = True
            if self.current is None:
                self.close()
        except httptools.HttpParserError as e:
            self._refuse(400, f"invalid HTTP request: {e}".encode())
        r = self.parsing
        if r is not None and 0 < r.head_at < self.reads:
            # This whole read went into a head that began in an earlier one and has not ended. The
            # parser keeps an unfinished header's value to itself (on_header sees it only whole), so
            # a header line that never ends is bounded here: by the limit plus two reads.
            r.head_read += len(data)
            if r.head_read > MAX_HEAD_BYTES:
                self._head_too_big()

    def pause_writing(self) -> None:
        self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        self.drain = None

    # -- httptools callbacks (inside feed_data) -----------------------------------------

    def on_message_begin(self) -> None:
        if self.refusal is None:  # (after a refusal, nothing more is answered)
            self.parsing = Request(self)

    def on_url(self, url: bytes) -> None:
        r = self.parsing
        if r is None:  # (refused: the parser runs to the end of the read it was in)
            return
        r.url += url
        r.size += len(url)  # (the head's bytes until the body starts; then the body's)
        if r.size > MAX_HEAD_BYTES:
            self._head_too_big()

    def on_header(self, name: bytes, value: bytes) -> None:
        r = self.parsing
        if r is None:
            return
        name = name.lower()
        if name == b"expect":  # its value is case-insensitive: as on_headers_complete looks for it
            value = value.strip().lower()
        r.headers.append((name, value))
        r.size += len(name) + len(value)
        if r.size > MAX_HEAD_BYTES:
            self._head_too_big()

    def _head_too_big(self) -> None:
        if not self.closed and self.refusal is None:
            self._refuse(431, b"request line and headers over %d bytes" % MAX_HEAD_BYTES)

    def on_headers_complete(self) -> None:
        r = self.parsing
        if r is None:
            return
        r.size = 0  # from here, the body's bytes
        r.head_at = 0
        r.method = self.parser.get_method().decode("ascii")
        r.http_version = self.parser.get_http_version()
        r.keep_alive = self.parser.should_keep_alive()
        if (b"expect", b"100-continue") in r.headers and self.current is None and not self.pending:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _continue(self, r: Request) -> None:
        """``100 Continue`` to a request whose head (all of it in, none of its body) asks for it,
        once it is its turn: its client may hold the body back until then."""
        if r.head_at == 0 and r.size == 0 and (b"expect", b"100-continue") in r.headers:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        r = self.parsing
        if r is None:
            return
        r.size += len(body)
        if r.size > MAX_BODY_BYTES:
            if not self.closed and self.refusal is None:
                self._refuse(413, b"request body over %d bytes" % MAX_BODY_BYTES)
            return
        r.body.append(body)

    def on_message_complete(self) -> None:
        r, self.parsing = self.parsing, None
        if r is None or self.closed:  # refused while parsing (or the client left): nothing to answer
            return
        if self.current is None:
            self._start(r)
        else:
            self.pending.append(r)
            if len(self.pending) >= _PIPELINE_DEPTH and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()

    # -- requests ---------------------------------------------------------------------------

    def _start(self, r: Request) -> None:
        try:
            parsed = httptools.parse_url(r.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, b"invalid request target")
            return
        self.current = r
        raw_path = parsed.path or b"/"
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": r.http_version,
            "method": r.method,
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": parsed.query or b"",
            "root_path": "",
            "headers": r.headers,
            "client": self.client,
            "server": self.local,
        }
        r.task = self.loop.create_task(self._run(r, scope))

    async def _run(self, r: Request, scope: dict[str, Any]) -> None:
        failure = "it never ended its answer"
        try:
            await self.app(scope, r.receive, r.send)
        except Exception as e:
            failure = type(e).__name__
            logger.exception("the router failed on %s %s", r.method, scope["path"])
        finally:
            if not r.finished:  # failed, or never ended its answer: the connection cannot be reused
                if not r.started or r.head is not None:  # nothing reached the client yet
                    self._write(_internal_error(failure))
                self.close()
            r.wake()

    def response_done(self, r: Request) -> None:
        """``r``'s last bytes are written: the next request may be answered."""
        self.current = None
        self.last_active = self.loop.time()
        if not r.keep_alive or self.closing:
            self.close()
            return
        if self.pending:
            self._start(self.pending.popleft())
        elif self.refusal is not None:  # every request before the refused one is answered
            self._write(self.refusal)
            self.close()
            return
        elif self.parsing is not None:  # its head came while this answer ran: 100 Continue now
            self._continue(self.parsing)
        resume = self.reading_paused and self.refusal is None and len(self.pending) < _PIPELINE_DEPTH
        if resume and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def shut(self) -> None:
        """The server is stopping: close now if idle, else after the current response."""
        self.closing = True
        if self.current is None:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """Close now, dropping what is still buffered (``connection_lost`` follows, as for a close)."""
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _refuse(self, status: int, message: bytes) -> None:
        """Answer ``status`` to the request being parsed and close. While an earlier request's answer
        runs (a pipelining client), that answer, and those of requests parsed whole before, end
        first; until then nothing more is read."""
        if self.current is None:
            self._write(_plain(status, message, keep_alive=False))
            self.close()
            return
        self.refusal = _plain(status, message, keep_alive=False)
        self.parsing = None
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    # One timer per connection, re-armed only when it fires: a request costs a timestamp.
    def _arm_timer(self) -> None:
        self.timer = self.loop.call_at(self.last_active + self.server.keep_alive_s, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self.drain is not None and self.drain is self.drain_at_timer:
            # Its socket buffer stayed full for a whole interval: a client that stopped reading (but
            # keeps the connection) would hold the request, and what it holds, forever. Aborted, not
            # closed: a close waits for the buffer to drain.
            self.abort()
            return
        self.drain_at_timer = self.drain
        idle = self.current is None and not self.pending and self.parsing is None
        if idle and self.loop.time() - self.last_active >= self.server.keep_alive_s:
            self.close()
            return
        if self.parsing is not None and self.current is None and self.reads == self.reads_at_timer:
            # Part of a request, then nothing for a whole interval (a body shorter than its
            # content-length, a client that stalled): without this it would hold the connection forever.
            self._refuse(408, b"the request stopped arriving before its end")
            return
        r = self.parsing
        if r is not None and r.head_at and r is self.head_at_timer and self.current is None:
            # A head still arriving a whole interval after the last tick saw it arriving: a client
            # sending a byte now and then would otherwise hold the connection without end (a head
            # has at most two intervals to arrive; a body, which may be large, only must not stall).
            self._refuse(408, b"the request's head did not arrive in time")
            return
        self.head_at_timer = r if r is not None and r.head_at else None
        self.reads_at_timer = self.reads
        if not idle:
            self.last_active = self.loop.time()
        self._arm_timer()


def _plain(status: int, message: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % (
        status,
        REASONS.get(status, b""),
        len(message),
    )
    return head + (b"" if keep_alive else b"connection: close\r\n") + b"\r\n" + message


def _internal_error(why: str) -> bytes:
    """The 500 for an app that failed before answering: in OpenAI's error shape, as every other
    error of the router, so clients (the OpenAI SDK among them) read it as an API error."""
    message = f"the router failed on this request ({why}); its log has the details"
    error = {"message": message, "type": "internal_error", "param": None, "code": "internal_error"}
    body = json.dumps({"error": error})
    head = b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
    return head + b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body.encode())


def _address(value: Any) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if isinstance(value, tuple) and len(value) >= 2 else None
