"""The router's HTTP/1.1 server against clients that misbehave, over real sockets: a header that
never ends, an ``Expect`` spelled in capitals, a client that stops reading its answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from tests.router.test_http_server import exchange, run
from tokenmill.router.http_server import HTTPServer
from tokenmill.router.server_connection import MAX_HEAD_BYTES


def test_a_header_that_never_ends_is_refused_before_it_fills_memory():
    """The head limit must hold for a single header line that keeps coming without its end (the
    parser keeps a header's value until it ends, so counting whole headers never sees it): a 431
    once a few times the limit has arrived, not a connection buffering without end."""

    async def check(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-big: ")
        sent, answer = 0, b""
        try:
            while sent < 40 * MAX_HEAD_BYTES and not answer:
                writer.write(b"a" * 16384)
                await writer.drain()
                sent += 16384
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(65536), 0.002)
        except ConnectionError:
            pass
        if not answer:
            answer = await asyncio.wait_for(reader.read(65536), 1.0)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431"), (sent, answer[:80])
        assert sent <= 10 * MAX_HEAD_BYTES, sent

    run(check)


def test_expect_100_continue_is_read_whatever_its_case():
    """``Expect`` values are case-insensitive (RFC 9110 10.1.1): a client sending
    ``100-Continue`` waits for the interim answer before its body, as one in lower case does."""

    async def check(port: int) -> None:
        head = b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-Continue\r\ncontent-length: 2\r\n\r\n"
        assert await exchange(port, head, until=b"100 Continue") == b"HTTP/1.1 100 Continue\r\n\r\n"

    run(check)


def test_a_pipelined_request_expecting_100_continue_gets_it_when_its_turn_comes():
    """A head asking for ``100 Continue`` that arrives while an earlier answer runs gets it once
    that answer ends (before then it would come in the middle of that answer); without it, a client
    holding its body back until then would wait, and the request end as a 408."""

    async def check(port: int) -> None:
        first = b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n"
        second = b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
        data = await exchange(port, first + second, until=b"100 Continue\r\n\r\n", read_s=1.0)
        assert data.endswith(b"0\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"), data

    run(check)


async def _endless(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An answer that never ends (a stream a worker keeps sending), and notes how it ended."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    try:
        while True:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await asyncio.sleep(0)
    finally:
        ended.append("ended")


ended: list[str] = []


def test_a_client_that_stops_reading_is_cut_off_and_its_request_ends():
    """A client that keeps its connection open but reads nothing: the answer's writes wait on its
    full socket buffer, and without a limit they would wait forever, holding whatever the request
    holds (a worker's slot, the team's parallel slot, its usage row in flight). After a whole
    ``keep_alive_s`` with nothing written, the connection is dropped and the request ends."""
    ended.clear()

    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = HTTPServer(_endless, keep_alive_s=0.3)
        task = asyncio.create_task(server.serve(sock))
        while not server.started:
            await asyncio.sleep(0.01)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(sock.getsockname())
        client.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")  # and never reads
        try:
            for _ in range(200):
                if ended:
                    break
                await asyncio.sleep(0.02)
            assert ended, "the answer still waits on a client that reads nothing"
        finally:
            client.close()
            server.exit()
            server.exit()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
