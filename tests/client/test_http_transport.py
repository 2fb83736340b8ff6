"""HTTPTransport against scripted loopback servers: framing, keep-alive, timeouts, broken servers."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from tokenmill.client import (
    ConnectError,
    HTTPTransport,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class ScriptedServer:
    """Answers each request with ``handler(reader, writer, n)``; counts connections and requests."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.disconnects = 0

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head.decode("latin-1").split("\r\n")[:-2]
                headers = dict(f.lower().split(": ", 1) for f in fields)
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests.append((line, headers, body))
                await self.handler(reader, writer, len(self.requests))
                await writer.drain()
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.disconnects += 1
        finally:
            writer.close()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def sse_handler(reader, writer, n):
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(3):
        writer.write(chunk(b'data: {"i": %d}\n\n' % i))
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def json_handler(reader, writer, n):
    body = json.dumps({"n": n}).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    writer.write(body)


def run(coro):
    return asyncio.run(coro)


def test_events_stream_with_arrival_times_and_the_request_is_well_formed():
    async def main():
        async with ScriptedServer(sse_handler) as server, HTTPTransport(server.url + "/v1") as http:
            body = {"stream": True, "prompt": "héllo"}
            async with http.stream("POST", "/completions", json=body, headers={"X-Tenant": "a"}) as response:
                assert response.status == 200
                assert response.headers["content-type"] == "text/event-stream"
                events = [e async for e in response.events()]
            line, headers, sent_body = server.requests[0]
            return events, response, line, headers, sent_body

    events, response, line, headers, sent_body = run(main())
    assert [e.data for e in events] == ['{"i": 0}', '{"i": 1}', '{"i": 2}', "[DONE]"]
    assert response.sent <= response.first_byte <= events[0].time
    gaps = [b.time - a.time for a, b in itertools.pairwise(events)]
    assert all(g >= 0.015 for g in gaps[:2])  # each stamped when it arrived, not when read
    assert line == "POST /v1/completions HTTP/1.1"
    assert headers["content-type"] == "application/json" and headers["x-tenant"] == "a"
    assert headers["host"].startswith("127.0.0.1:") and headers["user-agent"].startswith("tokenmill/")
    assert json.loads(sent_body) == {"stream": True, "prompt": "héllo"}


def test_connections_are_kept_alive_and_reused():
    async def main():
        async with ScriptedServer(json_handler) as server, HTTPTransport(server.url) as http:
            answers = [(await http.request("GET", "/v1/models")).json()["n"] for _ in range(5)]
            return answers, server.connections, http.open_connections

    answers, connections, open_connections = run(main())
    assert answers == [1, 2, 3, 4, 5]
    assert connections == 1 and open_connections == 1


def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error():
    async def close_after_answer(reader, writer, n):
        await json_handler(reader, writer, n)
        await writer.drain()
        writer.close()  # the server ends keep-alive without saying so

    async def main():
        async with ScriptedServer(close_after_answer) as server, HTTPTransport(server.url) as http:
            first = (await http.request("POST", "/x", json={})).json()
            await asyncio.sleep(0.05)
            second = (await http.request("POST", "/x", json={})).json()
            return first, second, server.connections

    first, second, connections = run(main())
    assert (first, second) == ({"n": 1}, {"n": 2}) and connections == 2


def test_a_request_lost_to_a_keep_alive_close_race_is_sent_once_more_on_a_new_connection():
    async def drop_second(reader, writer, n):
        if n == 2:  # closes as the request arrives: no byte of a response
            writer.close()
            return
        await json_handler(reader, writer, n)

    async def main():
        async with ScriptedServer(drop_second) as server, HTTPTransport(server.url) as http:
            first = (await http.request("POST", "/x", json={})).json()
            second = (await http.request("POST", "/x", json={})).json()
            return first, second, server.connections

    assert run(main()) == ({"n": 1}, {"n": 3}, 2)


def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry():
    async def drop(reader, writer, n):
        writer.close()

    async def main():
        async with ScriptedServer(drop) as server, HTTPTransport(server.url) as http:
            with pytest.raises(RemoteProtocolError):
                await http.request("POST", "/x", json={})
            return len(server.requests)

    assert run(main()) == 1


def test_the_server_closing_mid_body_is_a_protocol_error():
    async def cut(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: a\n\n"))
        await writer.drain()
        writer.close()

    async def main():
        async with ScriptedServer(cut) as server, HTTPTransport(server.url) as http:
            got = []
            with pytest.raises(RemoteProtocolError, match="before the response ended"):
                async with http.stream("POST", "/x", json={}) as response:
                    async for event in response.events():
                        got.append(event.data)
            return got, http.open_connections

    got, open_connections = run(main())
    assert got == ["a"] and open_connections == 0


def test_a_stream_that_ends_inside_an_event_is_a_protocol_error():
    async def partial(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\ndata: cut")

    async def main():
        async with (
            ScriptedServer(partial) as server,
            HTTPTransport(server.url) as http,
            http.stream("GET", "/x") as response,
        ):
            return [e async for e in response.events()]

    with pytest.raises(RemoteProtocolError, match="inside an event"):
        run(main())


def test_a_body_delimited_by_closing_the_connection_is_read_whole():
    async def http10(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def main():
        async with ScriptedServer(http10) as server, HTTPTransport(server.url) as http:
            response = await http.request("GET", "/x")
            return response.status, response.text, http.open_connections

    assert run(main()) == (200, "all of it", 0)


def test_error_statuses_are_responses_not_exceptions():
    async def too_many(reader, writer, n):
        body = b'{"error": {"message": "slow down"}}'
        head = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: %d\r\n\r\n" % len(body)
        writer.write(head + body)

    async def main():
        async with ScriptedServer(too_many) as server, HTTPTransport(server.url) as http:
            return await http.request("POST", "/v1/chat/completions", json={})

    response = run(main())
    assert response.status == 429 and response.headers["retry-after"] == "2"
    assert response.json()["error"]["message"] == "slow down"


def test_an_informational_response_before_the_real_one_is_skipped():
    async def early_hints(reader, writer, n):
        writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n")
        await json_handler(reader, writer, n)

    async def main():
        async with ScriptedServer(early_hints) as server, HTTPTransport(server.url) as http:
            response = await http.request("GET", "/x")
            return response.status, response.json(), "link" in response.headers

    assert run(main()) == (200, {"n": 1}, False)


def test_silence_past_the_read_timeout_raises_and_closes_the_connection():
    async def stall(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunk(b"data: a\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    async def main():
        async with ScriptedServer(stall) as server, HTTPTransport(server.url, read_timeout=0.2) as http:
            start = time.perf_counter()
            with pytest.raises(ReadTimeout, match=r"0\.2 s"):
                async with http.stream("GET", "/x") as response:
                    async for _ in response.events():
                        pass
            return time.perf_counter() - start, http.open_connections

    elapsed, open_connections = run(main())
    assert 0.15 < elapsed < 2.0 and open_connections == 0


def test_steady_trickle_within_the_read_timeout_is_not_a_timeout():
    async def trickle(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(6):
            writer.write(chunk(b"data: t\n\n"))
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async def main():
        async with (
            ScriptedServer(trickle) as server,
            HTTPTransport(server.url, read_timeout=0.3) as http,
            http.stream("GET", "/x") as response,
        ):
            return len([e async for e in response.events()])

    assert run(main()) == 6  # 0.6 s in all, never 0.3 s of silence


def test_an_unreachable_server_is_a_connect_error_naming_it():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        async with HTTPTransport(f"http://127.0.0.1:{port}") as http:
            await http.request("GET", "/health")

    start = time.perf_counter()
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
        run(main())
    assert time.perf_counter() - start < 5


def test_garbage_instead_of_http_is_a_protocol_error():
    async def garbage(reader, writer, n):
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async def main():
        async with ScriptedServer(garbage) as server, HTTPTransport(server.url) as http:
            await http.request("GET", "/x")

    with pytest.raises(RemoteProtocolError, match="does not parse"):
        run(main())


def test_the_pool_bounds_connections_and_queues_the_rest():
    async def slow(reader, writer, n):
        await asyncio.sleep(0.05)
        await json_handler(reader, writer, n)

    async def main():
        async with ScriptedServer(slow) as server, HTTPTransport(server.url, max_connections=2) as http:
            answers = await asyncio.gather(*(http.request("GET", "/x") for _ in range(6)))
            return sorted(a.json()["n"] for a in answers), server.connections

    answers, connections = run(main())
    assert answers == [1, 2, 3, 4, 5, 6] and connections == 2


def test_waiting_longer_than_the_pool_timeout_raises():
    async def slow(reader, writer, n):
        await asyncio.sleep(1.0)
        await json_handler(reader, writer, n)

    async def main():
        async with (
            ScriptedServer(slow) as server,
            HTTPTransport(server.url, max_connections=1, pool_timeout=0.1) as http,
        ):
            first = asyncio.create_task(http.request("GET", "/x"))
            await asyncio.sleep(0.02)
            with pytest.raises(PoolTimeout, match="1 connections"):
                await http.request("GET", "/y")
            return (await first).status

    assert run(main()) == 200


def test_leaving_a_stream_early_closes_its_connection_so_the_server_sees_the_client_go():
    async def endless(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(200):
            writer.write(chunk(b"data: more\n\n"))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async def main():
        async with ScriptedServer(endless) as server, HTTPTransport(server.url) as http:
            async with http.stream("GET", "/x") as response:
                async for _ in response.events():
                    break
            for _ in range(100):
                if server.disconnects:
                    break
                await asyncio.sleep(0.02)
            return server.disconnects, http.open_connections

    assert run(main()) == (1, 0)


def test_a_large_body_arrives_intact_through_flow_control():
    payload = bytes(range(256)) * 12_000  # 3 MB: past the high-water mark, so reading pauses

    async def big(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
        writer.write(payload)

    async def main():
        async with (
            ScriptedServer(big) as server,
            HTTPTransport(server.url) as http,
            http.stream("GET", "/x") as response,
        ):
            parts = []
            async for data, _ in response.aiter_bytes():
                parts.append(data)
                await asyncio.sleep(0)  # a slow reader
            return b"".join(parts)

    assert run(main()) == payload


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "GET /x HTTP/1.1\r\n"}, "method"),
        ({"path": "no-slash"}, "path"),
        ({"path": "/a b"}, "path"),
        ({"headers": {"x-bad": "a\r\nb"}}, "x-bad"),
        ({"headers": {"bad name": "v"}}, "bad name"),
        ({"headers": {"x-number": 5}}, "x-number"),
        ({"headers": {"x-list": ["a"]}}, "x-list"),  # (unhashable: the checked-lines cache must not hide it)
        ({"json": {}, "content": b"x"}, "json or content"),
    ],
)
def test_bad_requests_raise_value_errors_naming_the_field_and_send_nothing(kwargs, message):
    async def main():
        async with ScriptedServer(json_handler) as server, HTTPTransport(server.url) as http:
            args = {"method": "POST", "path": "/x", **kwargs}
            with pytest.raises(ValueError, match=message):
                await http.request(args.pop("method"), args.pop("path"), **args)
            return server.requests, http.open_connections

    assert run(main()) == ([], 0)


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host", "http://"])
def test_a_base_url_that_is_not_http_is_refused(url):
    with pytest.raises(ValueError, match="base_url"):
        HTTPTransport(url)


def test_the_transport_runs_on_uvloop_too():
    uvloop = pytest.importorskip("uvloop")  # a dependency on Linux and macOS: the router runs on it

    async def main():
        async with (
            ScriptedServer(sse_handler) as server,
            HTTPTransport(server.url) as http,
            http.stream("POST", "/x", json={}) as response,
        ):
            return [e.data async for e in response.events()]

    assert uvloop.run(main())[-1] == "[DONE]"
