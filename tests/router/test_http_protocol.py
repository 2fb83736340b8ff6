"""The router's HTTP protocol: a response's head leaves with the body sent in the same turn."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from tokenmill.router.http_protocol import HeadCoalescingProtocol, _HeadHoldingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_head_waits_for_the_body_of_the_same_turn_and_goes_alone_at_its_end():
    async def run() -> None:
        inner = RecordingTransport()
        t = _HeadHoldingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert inner.writes == []
        t.write(b"ok")
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]  # one send
        await asyncio.sleep(0)
        assert len(inner.writes) == 1  # nothing left to flush

        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")  # a stream's head
        await asyncio.sleep(0)
        assert inner.writes[-1].startswith(b"HTTP/1.1 200") and len(inner.writes) == 2
        t.write(b"5\r\nhello\r\n")  # later events go as they come
        assert inner.writes[-1] == b"5\r\nhello\r\n"

        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        t.close()  # closing sends what is held first
        assert inner.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n" and inner.closed
        assert t.get_write_buffer_size() == 0  # the rest is the socket transport's

    asyncio.run(run())


def test_whole_and_streamed_responses_arrive_intact_over_a_real_socket():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/whole":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
            await send({"type": "http.response.body", "body": b"whole"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"a", b"b"):
                await asyncio.sleep(0.01)
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    async def run() -> tuple[bytes, bytes]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, http=HeadCoalescingProtocol, lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        replies = []
        for path in ("/whole", "/stream"):  # one kept-alive connection, two requests
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b"content-length: 5" in head:
                replies.append(head + await reader.readexactly(5))
            else:
                replies.append(head + await reader.readuntil(b"0\r\n\r\n"))
        writer.close()
        server.should_exit = True
        await task
        return replies[0], replies[1]

    whole, streamed = asyncio.run(run())
    assert whole.startswith(b"HTTP/1.1 200 OK\r\n") and whole.endswith(b"\r\n\r\nwhole")
    assert streamed.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked" in streamed
    assert streamed.endswith(b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n")
