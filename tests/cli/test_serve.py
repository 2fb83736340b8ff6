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


def test_a_port_out_of_range_exits_2_before_the_model_loads():
    for option in ("--port", "--grpc-port"):
        done = subprocess.run([*SERVE, option, "70000"], capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 2 and f"{option} must be from" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "loading" not in done.stderr


def test_a_bad_engine_option_names_the_field():
    done = subprocess.run(
        [*SERVE, "--scheduling-policy", "lottery"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert done.returncode == 2
    assert "scheduling_policy='lottery' is invalid: allowed priority or fcfs" in done.stderr


def test_the_engine_options_of_the_guide_are_flags_and_are_checked():
    """--attention-backend, --preemption-priority-gap and --kv-watermark were EngineConfig fields
    that serve could not set."""
    for flag, value, says in (
        ("--attention-backend", "warp", "attention_backend='warp' is invalid: allowed one of auto,"),
        ("--kv-watermark", "0.7", "kv_watermark=0.7 is invalid"),
        ("--preemption-priority-gap", "0", "preemption_priority_gap=0 is invalid"),
    ):
        done = subprocess.run([*SERVE, flag, value], capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 2 and says in done.stderr, done.stderr


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


def test_a_bad_kv_cache_dtype_exits_2_naming_the_flag_and_the_allowed_values():
    from typing import get_args

    from typer.testing import CliRunner

    from tokenmill.cli.main import app
    from tokenmill.cli.serve import KVCacheDtype
    from tokenmill.engine.config import KV_CACHE_DTYPES

    result = CliRunner().invoke(app, ["serve", "--kv-cache-dtype", "fp16"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "Invalid value for '--kv-cache-dtype'" in result.output
    assert "'fp16' is not one of 'auto', 'fp8'" in result.output
    assert get_args(KVCacheDtype) == KV_CACHE_DTYPES  # the flag offers what the engine accepts


def test_a_worker_with_an_fp8_kv_cache_names_it_at_start_up():
    from tests.server.conftest import start_server

    server = start_server("--kv-cache-dtype", "fp8", "--kv-cache-memory", "16777216")
    try:
        ready = next(line for line in server.log if " ready: " in line)
        assert "KV cache 0.02 GiB in float8_e4m3fn + float32 scales = " in ready
        assert "API key" not in ready and "model 'demo';" in ready
    finally:
        server.stop()


def test_the_ready_line_says_the_weights_method_and_that_a_key_is_required():
    """A worker given $TOKENMILL_API_KEY by the environment (set for a client in the same shell)
    refused every request with nothing at start to say why; a quantized one looked like bf16."""
    from tests.server.conftest import start_server

    os.environ["TOKENMILL_API_KEY"] = "from-the-shell"
    try:
        server = start_server("--quantization", "int8", "--grpc-port", "-1")
    finally:
        del os.environ["TOKENMILL_API_KEY"]
    try:
        ready = next(line for line in server.log if " ready: " in line)
        assert "model 'demo' (int8);" in ready and ready.rstrip().endswith("; API key required"), ready
    finally:
        server.stop()
