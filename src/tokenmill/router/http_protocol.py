"""The router's HTTP/1.1 server protocol: uvicorn's httptools protocol, with a response's head sent
together with the body that follows it.

uvicorn writes a response's status line and headers to the socket as soon as
the app sends ``http.response.start``, and the body with the next message: two
``send`` system calls for every whole response the router relays, and two
wake-ups of the client, which reads the head alone first. On loopback a
``send`` runs the receiver's TCP input path in the sender's system call too, so
it is not cheap. Here the head waits until the end of the loop's turn: a body
sent in the same turn (a whole response, which the router relays in one piece)
goes out with it in one ``send``; a head alone (a stream whose first event has
not come yet) goes out at the end of the turn, as the head always did before
the app awaited anything.

Use: ``uvicorn.Config(app, http=HeadCoalescingProtocol)``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "


class _HeadHoldingTransport:
    """A transport that keeps a response's head until more bytes come or the turn ends."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            data, self._held = self._held + data, None
        elif data.startswith(_HEAD_START):
            self._held = data
            self._loop.call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            data, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the socket transport's own
        return getattr(self._transport, name)


class HeadCoalescingProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HeadHoldingTransport(transport, self.loop))  # type: ignore[arg-type]
