"""``tokenmill serve`` start-up failures: a clear line and an exit status, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SERVE = [sys.executable, "-m", "tokenmill.cli.main", "serve"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}


def test_a_taken_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*SERVE, "--port", str(port), "--grpc-port", "-1"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} for HTTP" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_engine_option_names_the_field():
    done = subprocess.run(
        [*SERVE, "--scheduling-policy", "lottery"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 2
    assert "scheduling_policy='lottery' is invalid: allowed priority or fcfs" in done.stderr


def test_a_simulated_worker_serves_the_api_with_modeled_step_times():
    import httpx

    from tests.server.conftest import start_server

    server = start_server("--runner", "simulated")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 7
        assert any("weights 0.00 GiB" in line for line in server.log)  # no model weights were loaded
    finally:
        server.stop()
