"""One worker process: the engine, the name it serves under, its identity and its metrics.

Both fronts (HTTP and gRPC) hold the same ``Worker``, so they share one engine,
one set of metrics and one notion of readiness and draining.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.protocol.errors import APIError
from tokenmill.server.metrics import ServingMetrics


@dataclass
class Worker:
    engine: AsyncEngine
    model_name: str  # what clients put in "model"
    worker_id: str  # stable across restarts: sent as x-tokenmill-worker on every response
    metrics: ServingMetrics
    api_key: str | None = None
    started_at: float = field(default_factory=time.time)
    draining: bool = False  # set on SIGTERM: refuse new requests, finish running ones

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def ready(self) -> bool:
        return self.engine.is_running and not self.draining

    def check_accepting(self) -> None:
        """Raise APIError 503 when this worker takes no new requests."""
        if self.draining:
            raise APIError.unavailable("this worker is shutting down; send the request elsewhere", 1.0)
        if not self.engine.is_running:
            raise APIError.unavailable("this worker's engine stopped; it must be restarted")


def default_worker_id(host: str, port: int) -> str:
    """host:port as others reach it: the same after a restart, distinct across workers of a host."""
    name = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"{name}:{port}"
