"""The router's HTTP front: a worker's OpenAI API, each request passed to the worker a policy picks.

A plain ASGI app (no framework): the request body goes to the worker as it
came, with the client's headers minus hop-by-hop ones, and the response comes
back byte for byte as the worker sends it (status, headers, SSE chunks), with
``x-tokenmill-worker`` added when the worker does not send it.

Failures: a worker that fails before its first byte (refused, reset, 5xx
counts against its health; a transport error means the request is tried on the
next worker); one that fails mid-stream ends the client's stream with an SSE
error event and ``data: [DONE]``, never leaving it hanging; a client that goes
away closes the worker connection, so the worker aborts the request
(``router/forward.py``). No available worker: 503 with ``Retry-After``.
A request naming a ``model`` goes only to workers that serve it (their
``/v1/models``, read by the health checks; a worker whose list is not known
takes any model); if no available worker serves it, 404 ``model_not_found``
naming the models they serve.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (routed),
``GET /v1/models`` (the union of the workers'), ``GET /health``, ``GET /ready``
(some worker available), ``GET /metrics`` (Prometheus, ``router/metrics.py``),
``GET /router/workers`` (the live distribution),
``POST /admin/workers`` (``{"url": ..., "action": "add" | "drain" | "remove"}``).
With a ``Gateway`` (``tokenmill route --gateway-config``) every routed request
is admitted by it first (keys, limits, the admission queue, the ledger), and
``/v1/usage``, ``/admin/teams`` and ``/admin/keys`` are served (``router/admin.py``);
``/v1/models`` then needs a key and lists the models the key's team may use
(without the workers' ``root`` paths; the admin key sees them all, as the
workers list them), and ``/router/workers`` and ``/admin/workers`` need the
admin key. A known path asked with another method is a 405 with ``Allow``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from tokenmill.client import HTTPTransport
from tokenmill.protocol.headers import SESSION_HEADER
from tokenmill.router.admin import send_not_allowed, serve_gateway_api
from tokenmill.router.admission import NoCapacity, QueueFull
from tokenmill.router.asgi import (
    forwarded_headers,
    json_object,
    read_body,
    send_error,
    send_json,
)
from tokenmill.router.call import (
    Call,
    Outcome,
    Prefill,
    as_read_at,
    asked_output,
    choices,
    estimate_tokens,
    sequences,
)
from tokenmill.router.forward import Forwarder
from tokenmill.router.gateway import body_for
from tokenmill.router.gateway_request import GatewayError
from tokenmill.router.health import FleetKeeper
from tokenmill.router.models_api import send_model_not_found, serve_models
from tokenmill.router.policies import Router, RouteRequest
from tokenmill.router.prefix_index import chunk_hashes, prompt_text
from tokenmill.router.status import fleet_status
from tokenmill.router.workers import Worker, WorkerPool
from tokenmill.router.workers_admin import serve_workers_admin

if TYPE_CHECKING:
    from tokenmill.router.gateway import Admitted, Gateway
    from tokenmill.router.prompt_blocks import PromptHasher


ROUTED = ("/v1/chat/completions", "/v1/completions")
_BLOCK_SIZE = 16  # until a worker's KV events say otherwise


class RouterApp:
    def __init__(
        self,
        pool: WorkerPool,
        router: Router,
        health_interval: float = 2.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        workers_file: Path | None = None,
        hasher: PromptHasher | None = None,
        gateway: Gateway | None = None,
    ) -> None:
        if router.policy == "kv" and hasher is None:
            raise ValueError("the kv policy needs the model's tokenizer (a PromptHasher)")
        self.pool = pool
        pool.on_eject = self._workers_changed
        self.router = router
        self.hasher = hasher
        self.gateway = gateway
        self.health_interval = health_interval
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._transports: dict[str, HTTPTransport] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None  # the gateway's running streams' rows
        self.keeper = FleetKeeper(
            pool, router, self._transport, health_interval, workers_file, self._workers_changed
        )
        self.forwarder = Forwarder(pool, self._transport, gateway.ledger if gateway is not None else None)

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if path in ROUTED:
            if method != "POST":
                await send_not_allowed(send, f"{path} takes POST, not {method}", ("POST",))
                return
            await self._proxy(scope, receive, send)
        elif path == "/v1/models":
            if method != "GET":
                await send_not_allowed(send, f"{path} takes GET, not {method}", ("GET",))
            else:
                await serve_models(self.pool, self._transport, self.gateway, scope, send)
        elif path == "/health":
            await send_json(send, 200, {"status": "ok"})
        elif path == "/ready":
            ready = bool(self.pool.available())
            await send_json(
                send, 200 if ready else 503, {"ready": ready, "workers": len(self.pool.available())}
            )
        elif path == "/metrics" and method == "GET":
            from tokenmill.router.metrics import CONTENT_TYPE, render

            body = render(self)
            headers = [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif path in ("/router/workers", "/admin/workers"):
            # Behind the gateway both show every team's name and load, and one changes the fleet:
            # the admin key's only. (/metrics stays open: Prometheus scrapes without keys.)
            allowed = "GET" if path == "/router/workers" else "POST"
            headers = forwarded_headers(scope["headers"]) if self.gateway is not None else {}
            if self.gateway is not None and not self.gateway.is_admin(headers):
                refusal = self.gateway.admin_refusal(headers)
                await send_error(send, refusal.status, refusal.message, kind=refusal.kind)
            elif method != allowed:
                await send_not_allowed(send, f"{path} takes {allowed}, not {method}", (allowed,))
            elif path == "/router/workers":
                await send_json(send, 200, self.status())
            else:
                query = scope.get("query_string", b"")
                await serve_workers_admin(self.pool, self.router, query, receive, send, self.status)
                self._workers_changed()
        elif self.gateway is not None and (
            path.startswith(("/admin/teams", "/admin/keys")) or path == "/v1/usage"
        ):
            await serve_gateway_api(self.gateway, scope, receive, send)
        else:
            await send_error(send, 404, f"no route {method} {path}", kind="not_found_error")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        if self._health_task is None:
            self._health_task = asyncio.create_task(self.keeper.run_forever())
        if self.gateway is not None and self._checkpoint_task is None:
            self._checkpoint_task = asyncio.create_task(self.gateway.checkpoint_forever())

    async def stop(self) -> None:
        for task in (self._health_task, self._checkpoint_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._health_task = self._checkpoint_task = None
        for transport in self._transports.values():
            await transport.aclose()
        self._transports.clear()
        if self.gateway is not None:
            self.gateway.ledger.commit()  # rows closed in the last turn of the loop

    # -- routing ---------------------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        try:
            request = as_read_at(scope["path"], json_object(body))
        except ValueError as e:
            if self.gateway is None:
                await send_error(send, 400, str(e))
            else:  # a caller without a valid key learns nothing of the body: 401, as for any request
                refusal = self.gateway.unreadable(forwarded_headers(scope["headers"]), str(e))
                await send_error(send, refusal.status, refusal.message, kind=refusal.kind)
            return
        headers = forwarded_headers(scope["headers"])
        # A session: the header routers use, or the one tokenmill's client sends, or the body's user.
        session = (
            headers.get("x-session-id") or headers.get(SESSION_HEADER) or _str_or_none(request.get("user"))
        )
        text = prompt_text(request)
        prompt_tokens, output_tokens = estimate_tokens(request, text)
        admitted = None
        if self.gateway is not None:
            try:
                admitted = self.gateway.admit(request, body, headers, prompt_tokens, asked_output(request))
            except GatewayError as e:
                await send_error(
                    send, e.status, e.message, kind=e.kind, retry_after=e.retry_after, param=e.param
                )
                return
            body = admitted.body
        outcome = Outcome(admitted)
        if admitted is not None and self.gateway is not None:
            self.gateway.follow(admitted, outcome.completion_so_far)
        call = Call(
            scope, receive, send, request, body, headers, session, text, prompt_tokens, output_tokens, outcome
        )
        try:
            if admitted is None:
                await self._route(call)
            else:
                await self._admit_and_route(call, admitted)
        except asyncio.CancelledError:
            outcome.state = "cancelled"
            raise
        finally:
            if admitted is not None and self.gateway is not None:
                self.gateway.finish(
                    admitted, outcome.usage(), outcome.state, outcome.status, outcome.worker, outcome.chunks()
                )

    async def _admit_and_route(self, call: Call, admitted: Admitted) -> None:
        """Through the pool's admission queue (priority bands, fair shares), then routed."""
        pool = admitted.team.pool
        model = _str_or_none(call.request.get("model"))
        if model is not None and self.pool.serves(model) is False:  # a set lookup, before it waits
            call.outcome.status, call.outcome.state = 404, "error"
            await send_model_not_found(call.send, self.pool, model)
            return
        queue = self.gateway.queue(pool, lambda: self._slots(pool))
        try:
            await queue.acquire(admitted.team.name, admitted.priority, admitted.reservation.tokens)
        except QueueFull as e:
            call.outcome.status, call.outcome.state = 429, "queue_full"
            await send_error(
                call.send, 429, str(e), kind="rate_limit_error", retry_after=e.retry_after, param="queue"
            )
            return
        except NoCapacity as e:  # no worker at all: nothing to wait for
            call.outcome.status, call.outcome.state = 503, "unavailable"
            await send_error(call.send, 503, f"{e}; retry shortly", kind="service_unavailable", retry_after=1)
            return
        try:
            await self._route(call, pool, queue.outranks_running(admitted.priority))
        finally:
            queue.release(admitted.priority)

    def _workers_changed(self) -> None:
        """After a health round or an admin order: the admission queues seat what new capacity
        allows, or, with no worker left, refuse what waits (503 now, not a 429 after max_wait_s)."""
        for queue in self.gateway.queues.values() if self.gateway is not None else ():
            queue.dispatch()

    def _slots(self, pool: str) -> int:
        """The pool's capacity, for the gateway's admission queue."""
        assert self.gateway is not None
        return self.pool.slots(pool, self.gateway.config.worker_slots)

    async def _route(self, call: Call, pool: str | None = None, jumps_queue: bool = False) -> None:
        """Choose a worker (of ``pool``, for the gateway) and forward; the next one if it fails first.
        ``jumps_queue``: the gateway admitted it above requests in flight (policies.py)."""
        scope, receive, send, request, body = call.scope, call.receive, call.send, call.request, call.body
        prompt_tokens, outcome, headers, text = call.prompt_tokens, call.outcome, call.headers, call.text
        blocks = None
        if self.hasher is not None:  # kv: exact blocks, unless the prompt is long and new (see below)
            blocks = await self.hasher.blocks(request, self._block_size(), wait=False)
            if blocks is not None:
                prompt_tokens = blocks.num_tokens
        # A long prompt the kv policy has not tokenized yet is routed by its text chunks, as the
        # prefix policy routes, while it is tokenized in the background: routing stays under a
        # millisecond, and a burst of a new prefix still lands together.
        prefix = (
            chunk_hashes(text) if self.router.policy == "prefix" or (self.hasher and blocks is None) else []
        )
        route = RouteRequest(
            prompt_tokens + call.output_tokens,
            call.session,
            prompt_tokens,
            prefix,
            blocks,
            jumps_queue,
            sequences(request),
            choices(request),
        )
        model = _str_or_none(request.get("model"))  # only workers that serve it (None: any)
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.pool.available(pool, model) if w.url not in tried]
            worker = self.router.choose(route, candidates)
            if worker is None:
                if not tried and model is not None and self.pool.available(pool):
                    outcome.status, outcome.state = 404, "error"
                    await send_model_not_found(send, self.pool, model)
                    return
                why = "every worker failed this request" if tried else "no worker is available"
                outcome.status, outcome.state = 503, "unavailable"
                await send_error(
                    send, 503, f"{why}; retry shortly", kind="service_unavailable", retry_after=1
                )
                return
            tried.add(worker.url)
            kv = self.router.kv if blocks is not None else None
            prefill = Prefill(worker, self.router.last_prefill, kv, blocks)
            sent = body_for(worker.engine, request, body) if outcome.admitted is not None else body
            if await self.forwarder.forward(
                worker, scope["path"], sent, headers, route, prefill, receive, send, outcome
            ):
                return

    def _block_size(self) -> int:
        sizes = self.router.kv.block_sizes
        return next(iter(sizes.values())) if sizes else _BLOCK_SIZE

    def _transport(self, worker: Worker) -> HTTPTransport:
        t = self._transports.get(worker.url)
        if t is None:
            t = HTTPTransport(
                worker.url,
                max_connections=4096,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )
            self._transports[worker.url] = t
        return t

    def status(self) -> dict[str, Any]:
        return fleet_status(self.router, self.pool, self.keeper, self.gateway, self.streams_cut)

    @property
    def streams_cut(self) -> int:
        """Streams that ended with an error event because their worker failed."""
        return self.forwarder.streams_cut


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
