"""A worker's gRPC front served for real on a loopback port, for tests of the service and its client.

The server runs in an event loop of its own, in a background thread, so one
server serves a whole test module while each test drives it from plain code
(the sync client) or from its own ``asyncio.run`` (the async client).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tokenmill.engine import AsyncEngine, EngineConfig, EngineStats, RequestOutput, StepRecord
from tokenmill.server.grpc_service import GrpcServer, start_grpc_server
from tokenmill.server.metrics import ServingMetrics
from tokenmill.server.worker import Worker

T = TypeVar("T")

# The embedded demo model, small enough that engine start-up and a 200-token request take well under a second.
MAX_MODEL_LEN = 256


def demo_engine(**config: Any) -> AsyncEngine:
    config.setdefault("max_model_len", MAX_MODEL_LEN)
    config.setdefault("kv_cache_memory", 1 << 24)
    return AsyncEngine(EngineConfig(**config))


def make_worker(engine: AsyncEngine, worker_id: str = "test-worker", **fields: Any) -> Worker:
    metrics = ServingMetrics("demo", token_budget=engine.engine.scheduler.config.max_num_batched_tokens)
    metrics.watch(engine.stats)
    engine.add_listener(metrics)
    return Worker(engine=engine, model_name="demo", worker_id=worker_id, metrics=metrics, **fields)


class Recorder:
    """An engine listener that keeps every finished request's last output, by request id."""

    def __init__(self) -> None:
        self.finished: dict[str, RequestOutput] = {}
        self._changed = threading.Condition()

    def on_step(self, record: StepRecord, stats: EngineStats) -> None:
        pass

    def on_request_finished(self, output: RequestOutput) -> None:
        with self._changed:
            self.finished[output.request_id] = output
            self._changed.notify_all()

    def wait(self, request_id: str, timeout: float = 5.0) -> RequestOutput:
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self.finished, timeout):
                raise AssertionError(f"request {request_id} did not finish within {timeout} s")
            return self.finished[request_id]


class Pacer:
    """An engine listener that sleeps after every step, so a long request lasts long on any machine.

    Deadline and abort tests need a request still running when they poke it;
    on a fast CPU the demo model makes 200 tokens in a quarter of a second.
    Listeners run on the engine's thread, so the sleep paces the engine itself.
    """

    def __init__(self, seconds_per_step: float = 0.01) -> None:
        self.seconds_per_step = seconds_per_step

    def on_step(self, record: StepRecord, stats: EngineStats) -> None:
        time.sleep(self.seconds_per_step)

    def on_request_finished(self, output: RequestOutput) -> None:
        pass


class ServerThread:
    """An event loop in a thread, serving gRPC fronts of workers until ``close()``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self._thread.start()
        self._servers: list[GrpcServer] = []

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    def serve(self, worker: Worker) -> str:
        """Start a server for ``worker`` on a free port; returns its address."""
        server = self.run(lambda: start_grpc_server(worker, "127.0.0.1", 0))
        self._servers.append(server)
        return server.address

    def close(self) -> None:
        for server in self._servers:
            self.run(lambda s=server: s.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self.loop.close()


def wait_blocks_free(engine: AsyncEngine, timeout: float = 5.0) -> None:
    """Poll until the engine holds no KV blocks and runs nothing (aborts are applied between steps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"KV blocks still in use after {timeout} s: {engine.stats()}")
