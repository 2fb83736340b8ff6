"""The request lifecycle at its edges, over real sockets on loopback: the router's HTTP server and
app (with a gateway) in this process, in front of a fake worker on the same event loop. What a
request holds (its admission slot, its team's parallel slot, its usage row) must come back however
it ends: a worker cut mid-answer, a client that stops reading, a client that never ends its head."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.router.test_http_server import serve_app
from tokenmill.router.app import RouterApp
from tokenmill.router.gateway import Gateway
from tokenmill.router.gateway_config import parse_gateway_config
from tokenmill.router.policies import Router
from tokenmill.router.workers import WorkerPool

CONFIG = {"ledger": "usage.db", "teams": {"search": {"models": ["demo"], "max_parallel": 4}}}
Reply = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def fake_worker(reply: Reply) -> tuple[asyncio.Server, str]:
    """A worker that answers GETs (health, metrics, models) with a short 200, and every POST with
    ``reply``, which writes what it likes and may close the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"content-length: (\d+)", head, re.I)
                await reader.readexactly(int(m.group(1)) if m else 0)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    continue
                await reply(writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def serving(
    tmp_path: Path,
    reply: Reply,
    check: Callable[[int, Gateway, str], Awaitable[None]],
    keep_alive_s: float = 30.0,
) -> None:
    """A gateway (``CONFIG``) in front of ``fake_worker(reply)``; ``check(port, gateway, key)``."""
    worker, url = await fake_worker(reply)
    gateway = Gateway(parse_gateway_config(CONFIG, tmp_path))
    key, _ = gateway.create_key("search")
    app = RouterApp(WorkerPool([url]), Router("least_load"), health_interval=0.2, gateway=gateway)
    try:
        await serve_app(app, lambda port: check(port, gateway, key), keep_alive_s, cut_off=True)
    finally:
        worker.close()
        gateway.ledger.close()


def post(key: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (key.encode(), len(data), data)
    )


CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


async def read_all(reader: asyncio.StreamReader, quiet_s: float) -> tuple[bytes, bool]:
    """What the router sends until it closes (True) or is quiet for ``quiet_s`` (False)."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), quiet_s):
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionError:
        pass
    return data, True


async def settled(gateway: Gateway, seconds: float = 5.0) -> None:
    """Until nothing of the team's is in flight any more (or ``seconds`` pass)."""
    for _ in range(int(seconds / 0.02)):
        if gateway.limiter.in_flight("search") == 0 and not gateway._running:
            return
        await asyncio.sleep(0.02)


# -- a worker cut mid-answer --------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_whole_answer_cut_mid_body_is_not_passed_off_as_complete(tmp_path: Path, framing: str):
    """A worker that dies halfway through a whole (non-streamed) JSON answer: the client must not
    get what it can read as the complete answer (a clean chunked end after half the JSON), nor be
    left waiting on a kept-alive connection for bytes that will never come (a short
    content-length): the router closes the connection, as a proxy does."""
    answer = json.dumps({"choices": [{"message": {"content": "x" * 200}}], "usage": {}}).encode()

    async def reply(writer: asyncio.StreamWriter) -> None:
        if framing == "content-length":
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            writer.write(head % len(answer) + answer[:100])
        else:
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
            writer.write(head + b"%x\r\n%s\r\n" % (100, answer[:100]))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def check(port: int, gateway: Gateway, key: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(key, CHAT))
        data, closed = await read_all(reader, quiet_s=2.0)
        writer.close()
        assert data.startswith(b"HTTP/1.1 200"), data
        assert closed, "the connection was kept alive after a cut answer: the client waits for the rest"
        assert not data.endswith(b"0\r\n\r\n"), "a cut answer was ended as if complete"
        await settled(gateway)
        assert gateway.limiter.in_flight("search") == 0
        assert [r["status"] for r in gateway.ledger.rows("search")] == ["cut"]

    asyncio.run(serving(tmp_path, reply, check))


# -- a client that stops reading ----------------------------------------------------------------


def test_a_client_that_stops_reading_a_stream_gives_back_what_its_request_held(tmp_path: Path):
    """A client that opens a stream and then reads nothing, keeping its connection: the router's
    writes wait on its full socket buffer. After a ``keep_alive_s`` with nothing written the
    router drops it; the request ends as cancelled, and its team's parallel slot, its admission
    slot and its usage row are given back (before, all were held for as long as the client
    wished)."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"%s"}}]}\n\n' % (b"x" * 4000)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        for _ in range(5000):  # about 20 MB, far more than any socket buffers
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.close()

    async def check(port: int, gateway: Gateway, key: str) -> None:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        client.send(post(key, {**CHAT, "stream": True}))  # and reads nothing after
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                if gateway.limiter.in_flight("search"):
                    break
            assert gateway.limiter.in_flight("search") == 1
            await settled(gateway, seconds=5.0)
            assert gateway.limiter.in_flight("search") == 0, "still held for a client reading nothing"
            assert gateway.queues["throughput"].in_flight == 0
            assert [r["status"] for r in gateway.ledger.rows("search")] == ["cancelled"]
        finally:
            client.close()

    asyncio.run(serving(tmp_path, reply, check, keep_alive_s=0.3))


# -- a client that leaves while its worker is silent --------------------------------------------


def test_a_stream_whose_client_leaves_while_the_worker_is_silent_ends_at_once(tmp_path: Path):
    """A worker that sent its head and then nothing (a long prefill, a queue): the client, which
    has seen nothing yet (the router sends the head with the first bytes of the body), leaves.
    The router noticed only at the worker's next chunk, so the request kept its team's parallel
    slot, its admission slot and its worker's request for as long as the worker stayed silent.
    Now the read is given up at once: the worker's connection closes (a tokenmill worker aborts
    the request) and the request is recorded as cancelled."""
    worker_has_it = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        worker_has_it.set()
        await asyncio.sleep(30)  # silent
        writer.close()

    async def check(port: int, gateway: Gateway, key: str) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(key, {**CHAT, "stream": True}))
        await asyncio.wait_for(worker_has_it.wait(), 5)
        await asyncio.sleep(0.2)  # the worker's head has reached the router
        assert gateway.limiter.in_flight("search") == 1
        writer.close()
        await settled(gateway, seconds=3.0)
        assert gateway.limiter.in_flight("search") == 0, "held until the silent worker's next chunk"
        assert gateway.queues["throughput"].in_flight == 0
        assert [r["status"] for r in gateway.ledger.rows("search")] == ["cancelled"]

    asyncio.run(serving(tmp_path, reply, check))


def test_a_stream_sent_with_a_content_length_goes_out_whole_after_the_usage_chunk_is_dropped(tmp_path: Path):
    """A worker that frames its stream by content-length: the gateway drops the usage chunk it
    asked for on the client's behalf, so the body came out shorter than the length the router
    passed on, and a kept-alive client waited for bytes that never came. Streams go out chunked."""
    events = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def reply(writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n"
        writer.write(head % len(events) + events)
        await writer.drain()

    async def check(port: int, gateway: Gateway, key: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post(key, {**CHAT, "stream": True}))
        data, _ = await read_all(reader, quiet_s=1.0)
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"content-length" not in head.lower() and b"transfer-encoding: chunked" in head.lower(), head
        assert body.endswith(b"0\r\n\r\n") and b"[DONE]" in body and b'"usage"' not in body
        await settled(gateway)
        (row,) = gateway.ledger.rows("search")
        assert (row["status"], row["completion_tokens"]) == ("ok", 1)

    asyncio.run(serving(tmp_path, reply, check))
