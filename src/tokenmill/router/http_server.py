"""The router's HTTP/1.1 server: ASGI for one app, with what a proxy in front of workers needs.

Why not uvicorn: every request through the router pays its server's Python
once, and a router's own work per request is small. Serving a fixed JSON
answer on the 2-core benchmark machine, uvicorn's httptools protocol spent
108 us of CPU a request where the bare httptools parser and a write spent 62
(docs/benchmarks.md). What this server leaves out is what the router does not
use: WebSockets, HTTP/2, proxy headers, access logs, per-header validation of
what the app sends (the router sends what it read from a worker or built
itself).

What it does:

- HTTP/1.1 keep-alive (and 1.0), requests pipelined on one connection answered
  in order, request bodies by length or chunked (llhttp decodes both),
  ``Expect: 100-continue``;
- a response's head goes out with its first body bytes, in one send; without a
  length from the app the body is chunked;
- writes wait while a slow client's socket buffer is full;
- malformed requests get a 400 and bodies over 64 MiB a 413, and the
  connection is closed (a pipelined one's, after the answers before it); an
  upgrade request is answered as plain HTTP; an app that fails before
  answering, a 500 in OpenAI's error shape (JSON, as the router's other
  errors); one that fails mid-answer, a closed connection;
- ``receive()`` after the body waits for the client to leave (or the response to
  end), as the app's disconnect watch expects;
- a head over 64 KiB, even one header line that never ends, is a 431; a
  request that stops arriving for ``keep_alive_s``, or whose head is not whole
  within two of them (however slowly it trickles), a 408; a client that reads
  nothing of its answer for ``keep_alive_s`` is cut off (its request ends, and
  gives back what it held);
- an idle kept-alive connection is closed after ``keep_alive_s``; on SIGINT or
  SIGTERM the server stops accepting, closes idle connections, lets running
  requests finish, then runs the app's lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any

from tokenmill.router.server_connection import ServerConnection


class HTTPServer:
    """``await HTTPServer(app).serve(sock)`` serves until SIGINT/SIGTERM (or ``exit()``)."""

    def __init__(self, app: Any, keep_alive_s: float = 30.0) -> None:
        self.app = app
        self.keep_alive_s = keep_alive_s
        self.started = False
        self.connections: set[ServerConnection] = set()
        self._exit: asyncio.Event | None = None

    def exit(self) -> None:
        """Stop: the first call lets running requests finish, a second one cuts them off."""
        if self._exit is None:
            return
        if self._exit.is_set():
            for connection in list(self.connections):
                connection.close()
        self._exit.set()

    async def serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        lifespan = _Lifespan(self.app)
        await lifespan.startup()
        server = await loop.create_server(lambda: ServerConnection(self), sock=sock, backlog=2048)
        signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, self.exit)
                signals.append(sig)
        self.started = True
        try:
            await self._exit.wait()
        finally:
            server.close()
            for connection in list(self.connections):
                connection.shut()
            while self.connections:  # running requests finish (a second signal cuts them off)
                await asyncio.sleep(0.05)
            for sig in signals:
                loop.remove_signal_handler(sig)
            await server.wait_closed()
            await lifespan.shutdown()


class _Lifespan:
    """ASGI lifespan: startup before the first request, shutdown after the last."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.done: dict[str, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        self.task = asyncio.create_task(self._run())
        await self._phase("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._phase("shutdown")
            await self.task

    async def _phase(self, phase: str) -> None:
        self.done[phase] = asyncio.get_running_loop().create_future()
        await self.messages.put({"type": f"lifespan.{phase}"})
        waiting = {self.done[phase], self.task}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)  # type: ignore[arg-type]
        if self.task is not None and self.task.done() and self.task.exception() is not None:
            raise self.task.exception()  # type: ignore[misc]

    async def _run(self) -> None:
        async def send(message: dict[str, Any]) -> None:
            phase = message["type"].removeprefix("lifespan.").split(".")[0]
            if phase in self.done and not self.done[phase].done():
                self.done[phase].set_result(None)

        await self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, self.messages.get, send)
