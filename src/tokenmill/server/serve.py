"""Run one worker: HTTP (uvicorn) and gRPC fronts over one ``AsyncEngine``, in one event loop.

SIGTERM (or Ctrl-C) drains: the worker stops taking requests (503, /ready
turns 503 so load balancers move on), lets the running ones finish for up to
``drain_timeout`` seconds, then closes both fronts and the engine. Requests
still running at the deadline, or at a second signal (which ends the drain at
once), are aborted in the engine first, so each client gets a whole answer
with finish reason ``abort`` (a stream: that chunk, then ``data: [DONE]``)
rather than a cut connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.config import EngineConfig
from tokenmill.server.app import build_app
from tokenmill.server.grpc_service import start_grpc_server
from tokenmill.server.metrics import ServingMetrics
from tokenmill.server.worker import Worker, default_worker_id

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """The worker cannot start serving (a port is taken, an address is wrong)."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the ready line says which)
    grpc_port: int | None = 50051  # None: no gRPC front; 0: any free port
    served_model_name: str | None = None  # None: the model folder's name ("demo" for the demo model)
    api_key: str | None = None
    vllm_metrics: bool = False  # also export metrics under vLLM's names
    drain_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM
    worker_id: str | None = None  # None: host:port


@dataclass(frozen=True)
class ReadyInfo:
    http_url: str
    grpc_target: str | None
    model_name: str
    worker_id: str
    max_num_seqs: int
    kv_summary: str
    quantization: str | None = None  # the weights' method, if quantized
    api_key: bool = False  # requests need one (--api-key, or $TOKENMILL_API_KEY in the environment)

    def line(self) -> str:
        grpc = f", gRPC {self.grpc_target}" if self.grpc_target else ""
        model = f"{self.model_name!r}" + (f" ({self.quantization})" if self.quantization else "")
        key = "; API key required" if self.api_key else ""
        return (
            f"tokenmill worker {self.worker_id} ready: {self.http_url}/v1{grpc}; model {model}; "
            f"concurrency limit {self.max_num_seqs} requests ({self.kv_summary}){key}"
        )


def build_worker(engine_config: EngineConfig, options: ServeOptions) -> Worker:
    """Load the model and wire the engine, its metrics and the worker's identity."""
    engine = AsyncEngine(engine_config)
    name = options.served_model_name or _default_model_name(engine)
    budget = engine.engine.scheduler.config.max_num_batched_tokens
    metrics = ServingMetrics(name, token_budget=budget, vllm_names=options.vllm_metrics)
    worker = Worker(
        engine=engine,
        model_name=name,
        worker_id=options.worker_id or default_worker_id(options.host, options.port),
        metrics=metrics,
        api_key=options.api_key,
    )
    metrics.watch(engine.stats, lambda: engine.num_in_flight)
    engine.add_listener(metrics)
    return worker


def _default_model_name(engine: AsyncEngine) -> str:
    path = engine.engine.model_config.path
    if engine.engine.config.model is None or path is None:
        return "demo"
    return path.name


class _Server(uvicorn.Server):
    """uvicorn, with signals handed to our drain (``on_signal(1)`` starts it, ``on_signal(2)``
    ends it now) instead of stopping at once."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None]):
        super().__init__(config)
        self._on_signal = on_signal
        self._signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        self._on_signal(self._signals)


async def serve(worker: Worker, options: ServeOptions, on_ready: Callable[[ReadyInfo], None]) -> None:
    """Serve until a signal drains the worker; then shut the engine down."""
    loop = asyncio.get_running_loop()
    drain_started, stop_now = asyncio.Event(), asyncio.Event()
    config = uvicorn.Config(
        build_app(worker),
        host=options.host,
        port=options.port,
        log_level=logging.getLogger().getEffectiveLevel(),
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    # uvicorn calls handle_exit from the signal handler, outside the loop: hence call_soon_threadsafe.
    http = _Server(config, lambda n: loop.call_soon_threadsafe(drain_started.set if n == 1 else stop_now.set))
    grpc_server = None
    try:
        listener = _bind(options.host, options.port)
        if options.grpc_port is not None:
            try:
                grpc_server = await start_grpc_server(worker, options.host, options.grpc_port)
            except RuntimeError as e:  # grpc reports a taken port this way
                raise ServeError(
                    f"cannot listen on {options.host}:{options.grpc_port} for gRPC: {e} "
                    "(--grpc-port 0 takes any free port, -1 serves no gRPC)"
                ) from None
        http_task = asyncio.create_task(http.serve(sockets=[listener]))
        while not http.started:
            if http_task.done():
                await http_task
                raise ServeError("the HTTP server stopped during start-up (see the log above)")
            await asyncio.sleep(0.02)
        port = listener.getsockname()[1]
        if options.worker_id is None and options.port == 0:
            worker.worker_id = default_worker_id(options.host, port)
        on_ready(
            ReadyInfo(
                http_url=f"http://{options.host}:{port}",
                grpc_target=f"{options.host}:{grpc_server.port}" if grpc_server else None,
                model_name=worker.model_name,
                worker_id=worker.worker_id,
                max_num_seqs=worker.engine.engine.config.max_num_seqs,
                kv_summary=worker.engine.engine.kv_plan.summary(),
                quantization=worker.engine.engine.quantization,
                api_key=bool(options.api_key),
            )
        )
        drain_waiter = asyncio.create_task(drain_started.wait())
        await asyncio.wait({http_task, drain_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if drain_started.is_set():
            await _drain(worker, options.drain_timeout, stop_now)
            http.should_exit = True
        await http_task
    finally:
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        worker.engine.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound here so a taken port is a clear error, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are
    # TCP, and accepted sockets inherit this one's protocol. Without it every streamed chunk after
    # the first can wait for the client's delayed ACK: 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} for HTTP: {e.strerror or e}") from None
    return sock


async def _drain(worker: Worker, timeout: float, stop_now: asyncio.Event) -> None:
    """Refuse new requests, wait for the running ones up to ``timeout`` (or ``stop_now``), then
    abort what is left, so that every response ends properly before the fronts close."""
    worker.draining = True
    pending = worker.engine.num_in_flight
    logger.warning(
        "draining: %d requests in flight, up to %.0f s to finish (a second signal: now)", pending, timeout
    )
    deadline = time.monotonic() + timeout
    while worker.engine.num_in_flight and time.monotonic() < deadline and not stop_now.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_now.wait(), 0.05)
    left = worker.engine.num_in_flight
    if left:
        why = "second signal" if stop_now.is_set() else "drain timeout"
        logger.warning("%s: aborting %d requests", why, left)
        # Their handlers then write the last chunk (finish reason abort), which uvicorn's and gRPC's
        # graceful stops wait for.
        await worker.engine.abort_all()
