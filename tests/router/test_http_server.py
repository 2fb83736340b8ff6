"""The router's HTTP/1.1 server, over real sockets: framing, keep-alive, pipelining, failures, shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tokenmill.router.http_server import HTTPServer


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/echo answers the body with a length; /stream in two chunks, no length; /fail raises before
    answering, /head-only after its head, /half after its first chunk; /wait answers once the
    client leaves."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        events.append("shutdown")
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = (await receive())["body"]
    path = scope["path"]
    if path == "/fail":
        raise RuntimeError("boom")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"ab", b"c"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path in ("/head-only", "/half"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if path == "/half":
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")
    if path == "/wait":
        message = await receive()
        events.append(message["type"])
        return
    answer = b"%s %s %s|" % (scope["method"].encode(), scope["raw_path"], scope["query_string"]) + body
    headers = [(b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


events: list[str] = []


async def serving(check: Callable[[int], Awaitable[None]], keep_alive_s: float = 30.0) -> HTTPServer:
    return await serve_app(app, check, keep_alive_s)


async def serve_app(
    the_app: Any, check: Callable[[int], Awaitable[None]], keep_alive_s: float = 30.0, cut_off: bool = False
) -> HTTPServer:
    """``the_app`` behind an HTTPServer on a free loopback port while ``check(port)`` runs; then it
    exits (``cut_off``: a second time, so whatever still runs is cut off)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = HTTPServer(the_app, keep_alive_s=keep_alive_s)
    task = asyncio.create_task(server.serve(sock))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        await check(sock.getsockname()[1])
    finally:
        server.exit()
        if cut_off:
            server.exit()
        await asyncio.wait_for(task, 10)
    return server


async def exchange(port: int, raw: bytes, until: bytes | None = None, read_s: float = 0.3) -> bytes:
    """Send ``raw``; read until ``until`` appears, the server closes, or ``read_s`` passes quietly."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = b""
    try:
        while until is None or until not in data:
            chunk = await asyncio.wait_for(reader.read(65536), read_s)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    writer.close()
    return data


def run(check: Callable[[int], Awaitable[None]], **kw: Any) -> HTTPServer:
    return asyncio.run(serving(check, **kw))


def test_keep_alive_and_pipelined_requests_are_answered_in_order_with_head_and_body_together():
    async def check(port: int) -> None:
        raw = b"".join(
            b"POST /echo?n=%d HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n%d" % (i, i) for i in range(3)
        )
        data = await exchange(port, raw, until=b"echo n=2|2")
        answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [
            b"POST /echo n=0|0",
            b"POST /echo n=1|1",
            b"POST /echo n=2|2",
        ]
        assert all(a.count(b"date: ") == 1 for a in answers)

    run(check)


def test_chunked_bodies_both_ways_expect_continue_and_head():
    async def check(port: int) -> None:
        upload = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        upload += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        assert (await exchange(port, upload, until=b"abcde")).endswith(b"POST /echo |abcde")
        streamed = await exchange(port, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n", until=b"0\r\n\r\n")
        assert b"transfer-encoding: chunked" in streamed
        assert streamed.endswith(b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
        expect = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(expect)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        assert (await asyncio.wait_for(reader.readuntil(b"|hi"), 5)).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        head = await exchange(port, b"HEAD /echo HTTP/1.1\r\nhost: x\r\n\r\n", until=b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")  # a length, no body

    run(check)


def test_http_1_0_and_connection_close_end_the_connection_after_the_answer():
    async def check(port: int) -> None:
        old = await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n", read_s=5)
        assert old.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in old and old.endswith(b"|")
        closing = await exchange(
            port, b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", read_s=5
        )
        assert b"connection: close" in closing and closing.endswith(b"GET /echo |")

    run(check)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET http://[::1 HTTP/1.1\r\nhost: x\r\n\r\n", b"400"),  # a target that does not parse
        (b"GET /fail HTTP/1.1\r\nhost: x\r\n\r\n", b"500"),
        (b"GET /head-only HTTP/1.1\r\nhost: x\r\n\r\n", b"500"),  # its head never left: still a 500
    ],
)
def test_malformed_requests_and_failing_apps_get_an_error_and_a_closed_connection(raw: bytes, status: bytes):
    async def check(port: int) -> None:
        data = await exchange(port, raw, read_s=5)  # read_s: the server must close, not the timeout
        assert data.startswith(b"HTTP/1.1 " + status) and b"connection: close" in data

    run(check)


def test_an_app_failing_before_its_answer_is_a_json_500_in_openais_error_shape():
    async def check(port: int) -> None:
        for path in (b"/fail", b"/head-only"):
            data = await exchange(port, b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % path, read_s=5)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500") and b"content-type: application/json" in head
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "internal_error" and "RuntimeError" in error["message"]

    run(check)


def test_an_app_failing_mid_answer_closes_the_connection():
    async def check(port: int) -> None:
        data = await exchange(port, b"GET /half HTTP/1.1\r\nhost: x\r\n\r\n", read_s=5)
        assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"4\r\npart\r\n")  # cut, not ended

    run(check)


def test_receive_after_the_body_tells_the_app_the_client_left():
    events.clear()

    async def check(port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /wait HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        assert events == []
        writer.close()
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.01)
        assert events == ["http.disconnect"]

    run(check)


def test_idle_connections_close_and_stopping_waits_for_running_answers():
    events.clear()

    async def check(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(1), 3) == b""  # idle past keep_alive_s: closed
        writer.close()
        # A request that stops arriving (a body shorter than its content-length): 408, closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        answer = await asyncio.wait_for(reader.read(), 3)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer
        writer.close()

    run(check, keep_alive_s=0.2)
    assert events == ["shutdown"]  # the app's lifespan ran its shutdown

    async def stop_mid_stream(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.005)
        answer = asyncio.ensure_future(reader.read(65536 * 4))
        assert server_box
        server_box[0].exit()  # stop while the stream runs: it still ends whole
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            data += await asyncio.wait_for(answer, 5)
            answer = asyncio.ensure_future(reader.read(65536))
        writer.close()

    server_box: list[HTTPServer] = []

    async def with_box() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = HTTPServer(app)
        server_box.append(server)
        task = asyncio.create_task(server.serve(sock))
        while not server.started:
            await asyncio.sleep(0.01)
        await stop_mid_stream(sock.getsockname()[1])
        await asyncio.wait_for(task, 10)
        assert not server.connections

    asyncio.run(with_box())


def test_oversized_bodies_are_413_and_upgrade_requests_get_a_plain_answer(monkeypatch: pytest.MonkeyPatch):
    import tokenmill.router.server_connection as server_connection

    monkeypatch.setattr(server_connection, "MAX_BODY_BYTES", 10)
    monkeypatch.setattr(server_connection, "MAX_HEAD_BYTES", 200)

    async def check(port: int) -> None:
        big = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n" + b"x" * 11
        refused = await exchange(port, big, read_s=5)
        assert refused.startswith(b"HTTP/1.1 413") and b"connection: close" in refused
        # A body within the limit after a head near its own: the two are counted apart.
        fits = (
            b"POST /echo HTTP/1.1\r\nhost: x\r\nx-pad: "
            + b"p" * 150
            + b"\r\ncontent-length: 9\r\n\r\n"
            + b"y" * 9
        )
        assert (await exchange(port, fits, read_s=5)).startswith(b"HTTP/1.1 200")
        for head in (b"GET /" + b"u" * 300 + b" HTTP/1.1\r\nhost: x\r\n\r\n",
                     b"GET /echo HTTP/1.1\r\nhost: x\r\nx-big: " + b"h" * 300 + b"\r\n\r\n"):  # fmt: skip
            too_big = await exchange(port, head, read_s=5)
            assert too_big.startswith(b"HTTP/1.1 431") and b"connection: close" in too_big
        upgrade = b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        plain = await exchange(port, upgrade, read_s=5)  # answered, then the connection ends
        assert plain.startswith(b"HTTP/1.1 200 OK") and plain.endswith(b"GET /echo |")

    run(check)
