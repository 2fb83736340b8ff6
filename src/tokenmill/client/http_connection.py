"""One keep-alive HTTP/1.1 connection, driven by asyncio callbacks and the httptools (llhttp) parser.

Why not httpx here: a benchmark or a batch client spends its CPU on the same
machine as what it measures, and every stream delivers one message per token.
httpx costs ~75 µs of CPU per SSE message (its async stack: httpcore, anyio,
line splitting in Python); this connection hands body bytes, stamped with their
arrival time, straight from the socket callback to the reader: ~15 µs.

One request at a time per connection (no pipelining). Body bytes wait in a
buffer until read; past ``HIGH_WATER`` bytes the socket stops being read, so a
slow reader holds back the server instead of filling memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import cast

import httptools

from tokenmill.client.http_errors import ReadTimeout, RemoteProtocolError

HIGH_WATER = 1 << 20  # buffered body bytes at which reading pauses
LOW_WATER = 1 << 18  # ... and resumes


class HTTPConnection(asyncio.Protocol):
    def __init__(self, read_timeout: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._read_timeout = read_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0  # loop.time() of the last bytes, for the read timeout
        self.closed = False
        self.responses = 0  # completed on this connection: > 0 means it was reused
        self._parser: httptools.HttpResponseParser | None = None
        self._complete = False
        self._reset()

    def _reset(self) -> None:
        # A connection kept alive after a complete response reuses its parser (llhttp reads one
        # message after another); a new one costs as much as parsing a response.
        if self._parser is None or not self._complete:
            self._parser = httptools.HttpResponseParser(self)
        self._active = False
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.first_byte: float | None = None  # perf_counter() of the response's first byte
        self._headers_done = False
        self._until_close = False  # no length and not chunked: the body ends when the connection does
        self._complete = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._chunks: deque[tuple[bytes, float]] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._now = 0.0

    # -- used by the transport ------------------------------------------------------

    def send(self, request: bytes) -> None:
        """Write a whole request (head and body); the previous response must be finished."""
        assert self._transport is not None and not self._active
        self._reset()
        self._active = True
        self._last_data = self._loop.time()
        self._arm_timer()
        self._transport.write(request)

    async def wait_headers(self) -> None:
        while not self._headers_done:
            self._raise_if_failed()
            await self._wait()

    async def read_chunk(self, coalesce: bool = False) -> tuple[bytes, float] | None:
        """The next body bytes with their arrival time, or None once the body is complete.
        ``coalesce``: every chunk already received, joined (stamped with the last one's time)."""
        while not self._chunks:
            if self._complete:
                return None
            self._raise_if_failed()
            await self._wait()
        if coalesce and len(self._chunks) > 1:
            parts = list(self._chunks)
            self._chunks.clear()
            data, at = b"".join(p for p, _ in parts), parts[-1][1]
        else:
            data, at = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered <= LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data, at

    @property
    def reusable(self) -> bool:
        """Finished its response cleanly and the server keeps it open."""
        return self._complete and self._keep_alive and not self.closed and not self._chunks

    @property
    def got_response_bytes(self) -> bool:
        return self.first_byte is not None

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self._stop_timer()
        self.closed = True

    def abandon(self, reason: str) -> None:
        """The reader gives up on this response (``StreamingResponse.abandon``)."""
        self._fail(RemoteProtocolError(reason))
        self.close()

    def finish(self) -> None:
        """The reader is done with this response (read to the end or abandoned)."""
        self._active = False
        if not self.reusable:
            self.close()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:  # bytes nobody asked for: the connection cannot be trusted
            self._keep_alive = False
            self.close()
            return
        self._now = time.perf_counter()
        self._last_data = self._loop.time()
        if self.first_byte is None:
            self.first_byte = self._now
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(RemoteProtocolError(f"the server's response does not parse as HTTP/1.1: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._active and not self._complete:
            if self._headers_done and self._until_close and exc is None:
                self.on_message_complete()
            else:
                reason = f": {exc}" if exc else ""
                message = f"the server closed the connection before the response ended{reason}"
                self._fail(RemoteProtocolError(message))

    # -- httptools callbacks (inside feed_data) ------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an informational response (103 Early Hints): the real one follows
            self.headers = []
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        names = {name for name, _ in self.headers}
        has_length = "content-length" in names or "transfer-encoding" in names
        self._until_close = not has_length and status not in (204, 304)
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append((body, self._now))
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self._headers_done:  # the end of an informational response
            return
        self._complete = True
        self.responses += 1
        self._wake()

    # -- waiting ------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self.closed and not self._complete:
            raise RemoteProtocolError("the connection is closed")

    # One timer per connection, re-armed only when it fires: data arriving costs a
    # timestamp, not a timer per chunk, and a kept-alive connection's next request finds it
    # still armed (an idle connection's timer fires once and lapses).
    def _arm_timer(self) -> None:
        if self._read_timeout is not None and self._timer is None:
            self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._active or self._complete or self._read_timeout is None:
            return
        if self._loop.time() - self._last_data < self._read_timeout:
            self._arm_timer()
            return
        self._fail(ReadTimeout(f"no bytes from the server for {self._read_timeout:g} s"))
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
