"""The router's health keeping: worker URLs refused where they are given, and a health loop that no
single worker (a URL, a /metrics value, a check that raises) can stop for the rest of the fleet."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.router.test_route import RouterProcess, wait_until
from tokenmill.client import HTTPTransport
from tokenmill.router.health import FleetKeeper
from tokenmill.router.policies import Router
from tokenmill.router.workers import Worker, WorkerPool, normalize

BAD_URLS = [
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:port", "Port could not be cast"),
    ("http://:8000", "no valid host"),
    ("http://127.0.0.1:0", "port must be from 1 to 65535"),
    ("ftp://127.0.0.1:8000", "looks like http://host:port"),
]


@pytest.mark.parametrize(("url", "why"), BAD_URLS)
def test_a_worker_url_that_does_not_parse_is_refused_naming_it(url: str, why: str):
    with pytest.raises(ValueError, match="worker URL") as e:
        normalize(url)
    assert repr(url) in str(e.value) and why in str(e.value)


def test_good_worker_urls_are_kept_as_written():
    assert normalize("http://[::1]:8000/v1/") == "http://[::1]:8000"
    assert normalize(" https://gpu-3.internal#latency") == "https://gpu-3.internal"
    assert normalize("http://10.0.0.5:8000/prefix") == "http://10.0.0.5:8000/prefix"


def route(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "route", "--port", "0", *args]
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def test_route_refuses_a_bad_worker_url_in_one_line_from_the_flag_and_the_file(tmp_path):
    done = route("--worker", "http://127.0.0.1:99999")
    assert done.returncode == 2, done.stderr
    assert "'http://127.0.0.1:99999'" in done.stderr and "Port out of range" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    listing = tmp_path / "workers.txt"
    listing.write_text("http://127.0.0.1:8000\nhttp://[::1\n")
    done = route("--workers-file", str(listing))
    assert done.returncode == 2 and "'http://[::1'" in done.stderr and "Traceback" not in done.stderr


class FakeWorker:
    """A worker that is up (``/health`` 200) and exports ``metrics`` as its /metrics."""

    def __init__(self, metrics: str):
        body = metrics.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, payload = {"/health": (200, b"ok"), "/metrics": (200, body)}.get(
                    self.path, (404, b"")
                )
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-Inf"])
def test_a_worker_exporting_a_non_finite_value_does_not_stop_the_health_checks(value: str):
    odd = FakeWorker(f"# TYPE tokenmill_concurrency_limit gauge\ntokenmill_concurrency_limit {value}\n")
    dead = dead_url()
    router = RouterProcess(odd.url, dead)
    try:
        # Three failed checks eject the dead worker: only while the loop still runs after the scrape.
        wait_until(
            lambda: (
                {w["url"]: w["healthy"] for w in router.status()["workers"]} == {odd.url: True, dead: False}
            ),
            "the dead worker's ejection",
        )
        (seen,) = [w for w in router.status()["workers"] if w["url"] == odd.url]
        assert seen["slots"] is None  # the value was ignored, not taken as a limit
    finally:
        router.stop()
        odd.stop()


def test_admin_refuses_a_worker_url_that_does_not_parse_or_an_unknown_field():
    dead = dead_url()
    router = RouterProcess(dead)
    try:
        for url in ("http://127.0.0.1:99999", "http://[::1"):
            r = httpx.post(f"{router.url}/admin/workers", json={"url": url}, timeout=5)
            assert r.status_code == 400 and r.json()["error"]["param"] == "url", r.text
            assert repr(url) in r.json()["error"]["message"]
        # A misspelt field is refused, not ignored ("acton": "drain" would have added the worker).
        r = httpx.post(f"{router.url}/admin/workers", json={"url": dead, "acton": "drain"}, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "acton", r.text
        assert "url, action" in r.json()["error"]["message"]
        wait_until(lambda: not router.status()["workers"][0]["healthy"], "the dead worker's ejection")
        assert [w["url"] for w in router.status()["workers"]] == [dead]
    finally:
        router.stop()


def test_a_check_that_raises_counts_as_that_workers_failure_and_the_others_are_still_checked():
    broken, dead = "http://127.0.0.1:1", dead_url()
    pool = WorkerPool([broken, dead])
    transports: dict[str, HTTPTransport] = {}

    def transport(w: Worker) -> HTTPTransport:
        if w.url == broken:
            raise RuntimeError("nobody foresaw this")
        return transports.setdefault(w.url, HTTPTransport(w.url, connect_timeout=1.0))

    keeper = FleetKeeper(pool, Router("least_load"), transport, interval=0.02)

    async def run() -> None:
        task = asyncio.create_task(keeper.run_forever())
        try:
            for _ in range(200):
                if not any(w.healthy for w in pool.workers):
                    break
                await asyncio.sleep(0.02)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for t in transports.values():
                await t.aclose()

    asyncio.run(run())
    assert {w.url: (w.healthy, w.failed >= 3) for w in pool.workers} == {
        broken: (False, True),
        dead: (False, True),
    }
