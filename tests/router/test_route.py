"""``tokenmill route`` in front of real ``tokenmill serve`` workers and scripted ones, on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server.conftest import start_server

_READY = re.compile(r"router ready: (http://\S+)/v1")


class RouterProcess:
    def __init__(
        self,
        *workers: str,
        policy: str = "round_robin",
        health_interval: float = 0.2,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        cmd = [sys.executable, "-m", "tokenmill.cli.main", "route", "--port", "0", "--policy", policy,
               "--health-interval", str(health_interval)]  # fmt: skip
        for w in workers:
            cmd += ["--worker", w]
        cmd += list(extra)
        env = {**os.environ, "COLUMNS": "300", **(env or {})}
        self.admin_key = env.get("TOKENMILL_ADMIN_KEY")  # behind a gateway, /router/workers needs it
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        before = []  # warnings and log lines (a worker's first health check) may come first
        line = self.proc.stderr.readline()
        while line and not _READY.search(line):
            before.append(line)
            line = self.proc.stderr.readline()
        self.ready_line, self.log_before_ready = line, "".join(before)
        m = _READY.search(line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"router did not start: {self.log_before_ready}{self.proc.stderr.read()}")
        self.url = m.group(1)
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def status(self) -> dict:
        headers = {"authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        return httpx.get(f"{self.url}/router/workers", headers=headers, timeout=5).json()


class Scripted:
    """A fake worker on its own thread: answers every POST with ``reply(n)`` bytes, in parts."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve(reader, writer):
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = (
                        int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                        if b"ength" in head
                        else 0
                    )
                    await reader.readexactly(length)
                    self.requests += 1
                    if head.startswith(b"GET /health"):
                        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        continue
                    for part in self.reply(self.requests):
                        if part is None:  # cut here
                            writer.close()
                            return
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.01)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(5)

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    b"x-tokenmill-worker: scripted\r\n\r\n"
)
EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"he"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{"content":"llo"}}]}\n\n',
    b"data: [DONE]\n\n",
]


@pytest.fixture(scope="module")
def workers():
    a, b = start_server(), start_server()  # KV events are on by default
    yield a, b
    a.stop()
    b.stop()


def chat(url: str, headers: dict[str, str] | None = None, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, headers=headers)


def test_round_robin_alternates_and_every_response_names_its_worker(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url)
    try:
        replies = [chat(router.url) for _ in range(4)]
        names = [r.headers["x-tokenmill-worker"] for r in replies]
        assert names[0] != names[1] and names[:2] == names[2:]
        # One Date, the router's: the worker's (and its Server) are not passed on beside it.
        assert all(len(r.headers.get_list("date")) == 1 for r in replies)
        assert all(len(r.headers.get_list("server")) <= 1 for r in replies)
        models = httpx.get(f"{router.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["demo"]
        assert sum(w["routed"] for w in router.status()["workers"]) == 4
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
        routed = [
            line for line in metrics.splitlines() if line.startswith("tokenmill_router_requests_total{")
        ]
        assert sorted(float(line.rsplit(" ", 1)[1]) for line in routed) == [2.0, 2.0]
        assert 'tokenmill_router_decisions_total{reason="round_robin"} 4.0' in metrics
        assert "tokenmill_router_imbalance_ratio 1.0" in metrics
    finally:
        router.stop()


def test_least_load_sends_the_next_request_to_the_idle_worker(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url, policy="least_load")
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "stream": True, "n": 2}
        with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as long:
            busy = long.headers["x-tokenmill-worker"]
            lines = long.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            assert all(chat(router.url).headers["x-tokenmill-worker"] != busy for _ in range(3))
            (held,) = [w for w in router.status()["workers"] if w["name"] == busy]
            assert (held["in_flight"], held["in_flight_sequences"]) == (1, 2)  # n: two in its batch
        wait_until(
            lambda: all(w["in_flight_sequences"] == 0 for w in router.status()["workers"]), "the stream's end"
        )
    finally:
        router.stop()


def test_a_session_sticks_to_one_worker(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url)
    try:
        names = {chat(router.url, user="alice").headers["x-tokenmill-worker"] for _ in range(4)}
        assert len(names) == 1
        # The header routers read, and the one tokenmill's Client(session_id=...) sends (which the
        # router ignored: a client's session was spread over every worker).
        for name in ("x-session-id", "x-tokenmill-session"):
            names = {
                chat(router.url, headers={name: f"s-{name}"}).headers["x-tokenmill-worker"] for _ in range(4)
            }
            assert len(names) == 1, name
    finally:
        router.stop()


def test_streams_pass_through_byte_for_byte():
    fake = Scripted(lambda n: [SSE_HEAD, *(chunk(e) for e in EVENTS), b"0\r\n\r\n"])
    router = RouterProcess(fake.url)
    try:
        with httpx.stream(
            "POST", f"{router.url}/v1/chat/completions", json={"stream": True}, timeout=10
        ) as r:
            body = b"".join(r.iter_raw())
            assert r.headers["x-tokenmill-worker"] == "scripted"
        assert body == b"".join(EVENTS)
    finally:
        router.stop()
        fake.stop()


def test_a_worker_failing_mid_stream_ends_the_stream_with_an_error_event():
    fake = Scripted(lambda n: [SSE_HEAD, chunk(EVENTS[0]), None])
    router = RouterProcess(fake.url)
    try:
        with httpx.stream(
            "POST", f"{router.url}/v1/chat/completions", json={"stream": True}, timeout=10
        ) as r:
            lines = [line for line in r.iter_lines() if line]
        assert lines[0] == EVENTS[0].decode().strip()
        assert "failed mid-stream" in json.loads(lines[1][6:])["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        assert router.status()["streams_cut"] == 1
    finally:
        router.stop()
        fake.stop()


def test_a_dead_worker_is_skipped_and_ejected_and_no_client_hangs(workers):
    a, _ = workers
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    router = RouterProcess(dead, a.url)
    try:
        start = time.monotonic()
        assert all(chat(router.url).status_code == 200 for _ in range(6))
        assert time.monotonic() - start < 20
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            state = {w["url"]: w["healthy"] for w in router.status()["workers"]}
            if not state[dead]:
                break
            time.sleep(0.1)
        assert state == {dead: False, a.url: True}
    finally:
        router.stop()


def test_no_worker_available_is_a_503_with_retry_after():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    router = RouterProcess(dead)
    try:
        r = chat(router.url)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{router.url}/ready", timeout=5).status_code in (200, 503)
    finally:
        router.stop()


def test_a_drained_worker_takes_no_new_requests_and_admin_errors_are_clear(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url)
    try:
        r = httpx.post(f"{router.url}/admin/workers", json={"url": a.url, "action": "drain"}, timeout=5)
        assert r.status_code == 200
        names = {chat(router.url).headers["x-tokenmill-worker"] for _ in range(4)}
        assert names == {b.url.removeprefix("http://")}
        bad = httpx.post(f"{router.url}/admin/workers", json={"url": a.url, "action": "explode"}, timeout=5)
        assert bad.status_code == 400 and "add, drain or remove" in bad.json()["error"]["message"]
        unknown = httpx.post(
            f"{router.url}/admin/workers", json={"url": "http://x:1", "action": "drain"}, timeout=5
        )
        assert unknown.status_code == 400 and "no worker" in unknown.json()["error"]["message"]
        for order, param in (
            ({"url": 5, "action": "add"}, "url"),
            ({"action": "add"}, "url"),
            ({"url": a.url, "action": ["add"]}, "action"),
            ([1], None),
            ("[" * 100_000, None),  # deeper than the parser's recursion
        ):
            content = order.encode() if isinstance(order, str) else json.dumps(order).encode()
            r = httpx.post(f"{router.url}/admin/workers", content=content, timeout=5)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, order
            assert "POST /admin/workers takes" in r.json()["error"]["message"]
    finally:
        router.stop()


def test_a_client_leaving_mid_stream_aborts_the_request_on_the_worker(workers):
    a, _ = workers
    router = RouterProcess(a.url)
    try:
        body = {"prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        a.wait_for(lambda: a.metric("tokenmill_requests_in_flight") == 0, timeout=5.0, what="the abort")
    finally:
        router.stop()


def test_bad_json_is_a_400_and_costs_no_worker_anything(workers):
    a, _ = workers
    router = RouterProcess(a.url)
    try:
        r = httpx.post(f"{router.url}/v1/chat/completions", content=b"{not json", timeout=5)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        deep = httpx.post(f"{router.url}/v1/chat/completions", content=b'{"a":' * 100_000, timeout=5)
        assert deep.status_code == 400 and "nests too deeply" in deep.json()["error"]["message"]
        assert router.status()["workers"][0]["routed"] == 0
    finally:
        router.stop()


def test_bodies_only_the_worker_can_judge_get_its_400_and_count_no_tokens(workers):
    a, _ = workers
    router = RouterProcess(a.url)
    try:
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}], "max_tokens": 3}
        r = httpx.post(f"{router.url}/v1/chat/completions", json=parts, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")  # was a 500
        huge = {"prompt": "x", "max_tokens": 3, "n": 10**12}  # counted as 2^31 tokens until refused
        assert httpx.post(f"{router.url}/v1/completions", json=huge, timeout=10).status_code == 400
        (w,) = router.status()["workers"]
        assert w["routed"] == 2 and w["routed_tokens"] == 0  # the tokens of what the worker refused: none
        assert chat(router.url).status_code == 200
        assert 0 < router.status()["workers"][0]["routed_tokens"] < 100
    finally:
        router.stop()


def test_prefix_policy_lands_a_shared_prefix_on_the_worker_that_caches_it(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url, policy="prefix")
    system = "Speak as the chorus of a play set in fair Verona, in two short lines. " * 16
    try:
        landed = []
        for i in range(4):
            body = {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Scene {i}"}]
            }
            r = httpx.post(f"{router.url}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
            landed.append(r.headers["x-tokenmill-worker"])
        assert len(set(landed)) == 1  # every request after the first followed the cached prefix
        status = router.status()
        assert (
            status["decisions"] == {"prefix_miss": 1, "prefix_hit": 3} and status["predicted_hit_tokens"] > 0
        )
        holder = a if landed[0] == a.url.removeprefix("http://") else b
        assert holder.metric("tokenmill_prefix_cache_hits_total") > 0  # the worker's own count agrees
    finally:
        router.stop()


def test_the_workers_file_is_re_read_when_it_changes(workers, tmp_path):
    a, b = workers
    listing = tmp_path / "workers.txt"
    listing.write_text(f"# the fleet\n{a.url}\n")
    router = RouterProcess(extra=("--workers-file", str(listing)))

    def urls():
        return sorted(w["url"] for w in router.status()["workers"])

    try:
        assert urls() == [a.url]
        time.sleep(0.05)
        listing.write_text(f"{a.url}\n{b.url}/v1\n")
        deadline = time.monotonic() + 5
        while urls() != sorted([a.url, b.url]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert urls() == sorted([a.url, b.url])
        listing.write_text(f"{b.url}\n")
        deadline = time.monotonic() + 5
        while urls() != [b.url] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert urls() == [b.url]  # a drained, then left once idle
        assert chat(router.url).headers["x-tokenmill-worker"] == b.url.removeprefix("http://")
    finally:
        router.stop()


def test_kv_policy_follows_the_workers_events_and_predicts_their_hits_exactly(workers):
    a, b = workers
    router = RouterProcess(a.url, b.url, policy="kv", extra=("--tokenizer", "demo"))
    system = "Hashes, not guesses: answer as the prologue of a tragedy, in one line. " * 16  # new to both
    try:
        wait_until(lambda: all(w["kv_events"] for w in router.status()["workers"]), "KV event streams")
        hits_before = [w.metric("tokenmill_prefix_cache_hits_total") for w in (a, b)]
        landed = []
        for i in range(4):
            body = {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Scene {i}"},
                ],
                "max_tokens": 2,
            }
            r = httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200
            landed.append(r.headers["x-tokenmill-worker"])
            holder = a.url if landed[0] == a.url.removeprefix("http://") else b.url
            wait_until(lambda h=holder: _known_blocks(router, h) > 0, "the holder's BlockStored event")
        assert len(set(landed)) == 1
        status = router.status()
        assert status["decisions"] == {"kv_miss": 1, "kv_hit": 3}
        measured = sum(w.metric("tokenmill_prefix_cache_hits_total") for w in (a, b)) - sum(hits_before)
        assert status["predicted_hit_tokens"] == measured > 0  # the router knew exactly what was cached
        # Text the tokenizer refuses is routed by load, and the worker's 400 names the field.
        lone = b'{"prompt": "\\ud800", "max_tokens": 3}'  # JSON's escape of a lone surrogate
        json_type = {"content-type": "application/json"}
        r = httpx.post(f"{router.url}/v1/completions", content=lone, headers=json_type, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    finally:
        router.stop()


def test_kv_policy_needs_the_tokenizer_and_names_the_option():
    cmd = [
        sys.executable,
        "-m",
        "tokenmill.cli.main",
        "route",
        "--worker",
        "http://127.0.0.1:1",
        "--policy",
        "kv",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "300"}
    )
    assert done.returncode == 2 and "--tokenizer" in done.stderr
    done = subprocess.run(
        [*cmd[:-1], "prefix", "--tokenizer", "demo"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--policy kv only" in done.stderr


def test_route_refuses_a_bad_port_an_empty_workers_file_and_a_status_url_that_is_no_router(tmp_path):
    route = [sys.executable, "-m", "tokenmill.cli.main", "route"]
    env = {**os.environ, "COLUMNS": "300"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*route, *args], capture_output=True, text=True, timeout=60, env=env)

    done = run("--worker", "http://127.0.0.1:1", "--port", "99999")
    assert done.returncode == 2 and "--port must be from 0 to 65535" in done.stderr
    assert "Traceback" not in done.stderr
    empty = tmp_path / "workers.txt"
    empty.write_text("# none yet\n")
    done = run("--workers-file", str(empty))
    assert done.returncode == 2 and f"--workers-file {empty} lists no worker" in done.stderr
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "workers").write_text("{}")  # a server answering JSON, not a router's
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/router/workers"), "the file server")
        done = run("status", f"http://127.0.0.1:{port}")
        assert done.returncode == 2 and "is not a tokenmill router's worker list" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        files.kill()
        files.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _known_blocks(router: RouterProcess, url: str) -> int:
    return next(w["kv_blocks_known"] for w in router.status()["workers"] if w["url"] == url)


def wait_until(check, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
