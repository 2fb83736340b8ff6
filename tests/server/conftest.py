"""Real ``tokenmill serve`` processes on loopback ports, for the HTTP API tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

_READY = re.compile(r"ready: (http://\S+)/v1(?:, gRPC (\S+);)?")


@dataclass
class ServerProcess:
    """A worker started with ``tokenmill serve``; its stderr is kept for failure messages."""

    proc: subprocess.Popen
    url: str = ""
    grpc_target: str | None = None
    log: list[str] = field(default_factory=list)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics by name with labels: 'tokenmill_requests_running{model_name="demo"}'."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        """Sum of a metric's samples over all label sets."""
        return sum(v for k, v in self.metrics().items() if k == name or k.startswith(name + "{"))

    def wait_for(self, condition, timeout: float = 10.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_server(*args: str, timeout: float = 60.0) -> ServerProcess:
    """Start ``tokenmill serve`` on free loopback ports and wait for its ready line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", "--port", "0", "--grpc-port", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    server = ServerProcess(proc)
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log.append(line)
            m = _READY.search(line)
            if m and not ready.is_set():
                server.url, server.grpc_target = m.group(1), m.group(2)
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise RuntimeError("tokenmill serve did not become ready:\n" + "".join(server.log))
    return server


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The demo model behind a plain worker, shared by the tests that leave it as they found it."""
    s = start_server("--vllm-metrics")
    yield s
    s.stop()
