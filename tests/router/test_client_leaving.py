"""A client that leaves before its whole (unstreamed) answer: the router stops the worker's request,
and the gateway records it as cancelled with only what was generated."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.router.test_gateway import CONFIG, create_key, start_gateway, usage_rows
from tests.router.test_route import RouterProcess
from tests.server.conftest import start_server

LONG = b'{"model": "demo", "prompt": "ROMEO:", "max_tokens": 1000, "ignore_eos": true}'


@pytest.fixture(scope="module")
def worker():
    w = start_server("--grpc-port", "-1")
    yield w
    w.stop()


def leave_mid_request(url: str, key: str | None = None) -> None:
    """Send a long whole request, let the worker start on it, and hang up."""
    host, port = url.removeprefix("http://").split(":")
    auth = f"authorization: Bearer {key}\r\n".encode() if key else b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + auth
            + b"content-length: %d\r\n\r\n%s" % (len(LONG), LONG)
        )
        time.sleep(0.5)


def test_the_router_aborts_a_whole_request_whose_client_left(worker):
    router = RouterProcess(worker.url)
    try:
        leave_mid_request(router.url)
        worker.wait_for(
            lambda: worker.metric("tokenmill_requests_in_flight") == 0, timeout=5.0, what="the abort"
        )
    finally:
        router.stop()


def test_the_gateway_records_a_whole_request_whose_client_left_as_cancelled(worker, tmp_path: Path):
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    key = create_key(config, "alpha")
    router = start_gateway(worker, config)
    try:
        leave_mid_request(router.url, key)
        worker.wait_for(
            lambda: worker.metric("tokenmill_requests_in_flight") == 0, timeout=5.0, what="the abort"
        )
        gateway = type("G", (), {"config": config})
        deadline = time.monotonic() + 5
        while (rows := usage_rows(gateway, "alpha"))[-1:] and rows[-1]["status"] == "in_flight":
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        (row,) = rows
        assert row["status"] == "cancelled" and row["worker"], row
        # Its prompt is charged (the worker read it); not the 1,000 tokens it asked for.
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] == 0 and row["cost"] > 0
    finally:
        router.stop()
