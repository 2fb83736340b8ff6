"""The router's HTTP/1.1 server against clients that misbehave, over real sockets: a header that
never ends, a head sent a byte at a time, a pipelined request past a limit while an answer runs, an
``Expect`` spelled in capitals, a client that stops reading its answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import pytest

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


def test_a_head_sent_a_byte_at_a_time_is_refused_within_two_intervals():
    """A client trickling its head (a byte every so often, each read resetting any stall check)
    would hold its connection without end: the head must be whole within two keep-alive intervals
    of the timer first seeing it, or the answer is a 408 and the connection ends."""

    async def check(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /echo HTTP/1.1\r\nhost: x\r\nx-slow: ")
        began, answer = time.monotonic(), b""
        with contextlib.suppress(ConnectionError):
            while not answer and time.monotonic() - began < 5.0:
                writer.write(b"a")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    answer = await asyncio.wait_for(reader.read(65536), 0.05)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b"head did not arrive" in answer
        assert time.monotonic() - began < 1.5  # three intervals of 0.3 s, and the test's own slack

    run(check, keep_alive_s=0.3)


@pytest.mark.parametrize("limit", ["MAX_HEAD_BYTES", "MAX_BODY_BYTES"])
def test_a_pipelined_request_past_a_limit_is_refused_after_the_running_answer(
    monkeypatch: pytest.MonkeyPatch, limit: str
):
    """Requests pipelined behind a long answer: one past the head or body limit is refused once
    the answers before it have ended, not by cutting the running answer short; the requests
    parsed before it are answered, those after it are not (the connection ends with its refusal)."""
    import tokenmill.router.server_connection as server_connection

    monkeypatch.setattr(server_connection, "MAX_BODY_BYTES", 10)
    monkeypatch.setattr(server_connection, "MAX_HEAD_BYTES", 200)

    async def check(port: int) -> None:
        running = b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n"
        before = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nbefore"
        if limit == "MAX_HEAD_BYTES":
            refused = b"GET /echo HTTP/1.1\r\nhost: x\r\nx-big: " + b"h" * 300 + b"\r\n\r\n"
            status = b"HTTP/1.1 431"
        else:
            refused = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n" + b"x" * 11
            status = b"HTTP/1.1 413"
        after = b"GET /after HTTP/1.1\r\nhost: x\r\n\r\n"
        data = await exchange(port, running + before + refused + after, read_s=2.0)
        stream_end = data.find(b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
        assert stream_end > 0, data  # the running answer whole
        assert data.find(b"POST /echo |before") > stream_end, data
        assert data.rfind(status) > data.find(b"POST /echo |before"), data
        assert b"connection: close" in data[data.rfind(status) :]
        assert b"/after" not in data  # read after the refusal: not answered

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
