"""The router's HTTP front: a worker's OpenAI API, each request passed to the worker a policy picks.

A plain ASGI app (no framework): the request body goes to the worker as it
came, with the client's headers minus hop-by-hop ones, and the response comes
back byte for byte as the worker sends it (status, headers, SSE chunks), with
``x-tokenmill-worker`` added when the worker does not send it.

Failures: a worker that fails before its first byte (refused, reset, 5xx
counts against its health; a transport error means the request is tried on the
next worker); one that fails mid-stream ends the client's stream with an SSE
error event and ``data: [DONE]``, never leaving it hanging; a client that goes
away closes the worker connection, so the worker aborts the request. No
available worker: 503 with ``Retry-After``.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (routed),
``GET /v1/models`` (the union of the workers'), ``GET /health``, ``GET /ready``
(some worker available), ``GET /metrics`` (Prometheus, ``router/metrics.py``),
``GET /router/workers`` (the live distribution),
``POST /admin/workers`` (``{"url": ..., "action": "add" | "drain" | "remove"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive, Scope, Send

from tokenmill.client import HTTPTransport, TransportError
from tokenmill.router.health import FleetKeeper
from tokenmill.router.kv_index import KVIndex
from tokenmill.router.policies import Router, RouteRequest
from tokenmill.router.prefix_index import chunk_hashes, prompt_text
from tokenmill.router.workers import Worker, WorkerPool

if TYPE_CHECKING:
    from tokenmill.router.admission import AdmissionQueue
    from tokenmill.router.gateway import Admitted, Gateway
    from tokenmill.router.prompt_blocks import PromptBlocks, PromptHasher
    from tokenmill.router.usage_meter import UsageMeter

logger = logging.getLogger(__name__)

ROUTED = ("/v1/chat/completions", "/v1/completions")
WORKER_HEADER = b"x-tokenmill-worker"
SESSION_HEADER = "x-session-id"
# Headers that describe one connection, not the request: never passed on (content-length is
# set again for the body as it goes out).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_DEFAULT_OUTPUT_TOKENS = 256  # for the load estimate when a request names no max_tokens
_CHARS_PER_TOKEN = 4  # the load estimate's tokenizer (the kv policy counts exactly)
_TEMPLATE_TOKENS = 6  # what a chat template adds per message, about (Llama 3: 5, ChatML: 5)
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
        self.router = router
        self.hasher = hasher
        self.gateway = gateway
        self._queues: dict[str, AdmissionQueue] = {}  # gateway: one admission queue per pool
        self.health_interval = health_interval
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._transports: dict[str, HTTPTransport] = {}
        self._health_task: asyncio.Task[None] | None = None
        self.keeper = FleetKeeper(pool, router, self._transport, health_interval, workers_file)
        self.streams_cut = 0  # streams that ended with an error event because their worker failed

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
                await _error(send, 405, f"{path} takes POST")
                return
            await self._proxy(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            await _json(send, 200, await self._models())
        elif path == "/health":
            await _json(send, 200, {"status": "ok"})
        elif path == "/ready":
            ready = bool(self.pool.available())
            await _json(send, 200 if ready else 503, {"ready": ready, "workers": len(self.pool.available())})
        elif path == "/metrics" and method == "GET":
            from tokenmill.router.metrics import CONTENT_TYPE, render

            body = render(self)
            headers = [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif path == "/router/workers" and method == "GET":
            await _json(send, 200, self.status())
        elif path == "/admin/workers" and method == "POST":
            if self.gateway is not None and not self.gateway.is_admin(_forwarded(scope["headers"])):
                await _error(send, 401, "the admin key is required", kind="authentication_error")
                return
            await self._admin(receive, send)
        elif self.gateway is not None and (
            path.startswith(("/admin/teams", "/admin/keys")) or path == "/v1/usage"
        ):
            await self._gateway_api(scope, receive, send)
        else:
            await _error(send, 404, f"no route {method} {path}", kind="not_found_error")

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

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for transport in self._transports.values():
            await transport.aclose()
        self._transports.clear()

    # -- routing ---------------------------------------------------------------------------

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            await _error(send, 400, f"the body is not valid JSON: {e}")
            return
        headers = _forwarded(scope["headers"])
        session = _header(scope["headers"], SESSION_HEADER) or _str_or_none(request.get("user"))
        text = prompt_text(request)
        prompt_tokens, output_tokens = _estimate_tokens(request, text)
        admitted = None
        if self.gateway is not None:
            from tokenmill.router.gateway import GatewayError

            try:
                admitted = self.gateway.admit(request, headers, prompt_tokens, _asked_output(request))
            except GatewayError as e:
                await _error(send, e.status, e.message, kind=e.kind, retry_after=e.retry_after, param=e.param)
                return
            body = json.dumps(request).encode()
        outcome = _Outcome(admitted)
        call = _Call(
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

    async def _admit_and_route(self, call: _Call, admitted: Admitted) -> None:
        """Through the pool's admission queue (priority bands, fair shares), then routed."""
        from tokenmill.router.admission import QueueFull

        pool = admitted.team.pool
        queue = self._queue(pool)
        try:
            await queue.acquire(admitted.team.name, admitted.priority, admitted.reservation.tokens)
        except QueueFull as e:
            call.outcome.status, call.outcome.state = 429, "queue_full"
            await _error(
                call.send, 429, str(e), kind="rate_limit_error", retry_after=e.retry_after, param="queue"
            )
            return
        try:
            await self._route(call, pool)
        finally:
            queue.release(admitted.priority)

    def _queue(self, pool: str) -> AdmissionQueue:
        queue = self._queues.get(pool)
        if queue is None:
            from tokenmill.router.admission import AdmissionQueue, QueuePolicy

            gateway = self.gateway
            assert gateway is not None
            config = gateway.config
            policy = QueuePolicy(
                config.max_waiting, config.max_wait_s, config.aging_s, config.fair_queuing, config.overflow
            )

            def capacity() -> int:
                return sum(w.slots or config.worker_slots for w in self.pool.available(pool))

            def weight(team: str) -> float:
                t = gateway.teams.get(team)
                return t.weight if t is not None else 1.0

            queue = self._queues[pool] = AdmissionQueue(capacity, policy, weight)
        return queue

    async def _route(self, call: _Call, pool: str | None = None) -> None:
        """Choose a worker (of ``pool``, for the gateway) and forward; the next one if it fails first."""
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
        route = RouteRequest(prompt_tokens + call.output_tokens, call.session, prompt_tokens, prefix, blocks)
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.pool.available(pool) if w.url not in tried]
            worker = self.router.choose(route, candidates)
            if worker is None:
                why = "every worker failed this request" if tried else "no worker is available"
                outcome.status, outcome.state = 503, "unavailable"
                await _error(send, 503, f"{why}; retry shortly", kind="service_unavailable", retry_after=1)
                return
            tried.add(worker.url)
            kv = self.router.kv if blocks is not None else None
            prefill = _Prefill(worker, self.router.last_prefill, kv, blocks)
            output = route.tokens - route.prompt_tokens
            sent = _body_for(worker, request, body) if outcome.admitted is not None else body
            if await self._forward(
                worker, scope["path"], sent, headers, route.tokens, output, prefill, receive, send, outcome
            ):
                return

    def _block_size(self) -> int:
        sizes = self.router.kv.block_sizes
        return next(iter(sizes.values())) if sizes else _BLOCK_SIZE

    async def _forward(
        self,
        worker: Worker,
        path: str,
        body: bytes,
        headers: dict[str, str],
        tokens: int,
        output: int,
        prefill: _Prefill,
        receive: Receive,
        send: Send,
        outcome: _Outcome,
    ) -> bool:
        """Send the request to ``worker`` and stream its answer back. False if the worker failed
        before its first byte (nothing reached the client: the request may go elsewhere)."""
        self.pool.started(worker, tokens, output)
        started = False
        try:
            async with self._transport(worker).stream(
                "POST", path, content=body, headers=headers
            ) as response:
                if response.status >= 500:
                    self.pool.failed(worker)
                else:
                    self.pool.succeeded(worker)
                    if WORKER_HEADER.decode() in response.headers and worker.name == worker.url:
                        worker.name = response.headers[WORKER_HEADER.decode()]
                await send(_start(response.status, response.headers, worker))
                started = True
                outcome.status, outcome.worker = response.status, worker.name
                outcome.state = "ok" if response.status < 400 else "error"
                sse = response.headers.get("content-type", "").startswith("text/event-stream")
                meter = outcome.meter_for(sse)
                await self._relay(response, sse, receive, send, prefill, meter, outcome)
            return True
        except TransportError as e:
            self.pool.failed(worker)
            if started:
                outcome.state = "cut"
            if not started:
                logger.warning("worker %s failed before answering (%s); trying another", worker.url, e)
                return False
            return True  # _relay has ended the client's response
        finally:
            self.pool.finished(worker, tokens, output)
            prefill.done()

    async def _relay(
        self,
        response: Any,
        sse: bool,
        receive: Receive,
        send: Send,
        prefill: _Prefill,
        meter: UsageMeter | None,
        outcome: _Outcome,
    ) -> None:
        """The worker's body to the client as it comes (through the gateway's usage meter, if any);
        stops (closing the worker's stream, which aborts the request there) if the client goes
        away."""
        # Only a stream needs watching: a whole response comes in one piece right after its head.
        gone = asyncio.ensure_future(_wait_for_disconnect(receive)) if sse else None
        try:
            async for data, _ in response.aiter_bytes():
                prefill.done()  # the first byte: the prompt is in the worker's cache now
                if gone is not None and gone.done():
                    outcome.state = "cancelled"
                    return
                if meter is not None:
                    data = meter.feed(data)
                    if not data:
                        continue
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if meter is not None:
                meter.finish()
        except TransportError as e:
            self.streams_cut += 1
            if sse:  # the client sees why its stream ended, then the end
                error = json.dumps(_error_body(f"the worker failed mid-stream: {e}", "server_error"))
                tail = f"data: {error}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            raise
        finally:
            if gone is not None:
                gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

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

    # -- the rest of the API -------------------------------------------------------------

    async def _models(self) -> dict[str, Any]:
        async def one(w: Worker) -> list[dict[str, Any]]:
            try:
                response = await self._transport(w).request("GET", "/v1/models")
                return list(response.json().get("data") or []) if response.status == 200 else []
            except (TransportError, ValueError):
                return []

        seen: dict[str, dict[str, Any]] = {}
        for models in await asyncio.gather(*(one(w) for w in self.pool.available())):
            for m in models:
                seen.setdefault(str(m.get("id")), m)
        return {"object": "list", "data": list(seen.values())}

    async def _admin(self, receive: Receive, send: Send) -> None:
        try:
            order = json.loads(await _read_body(receive) or b"{}")
            url, action = order["url"], order.get("action", "add")
            if action == "add":
                self.pool.add(url)
            elif action == "drain":
                self.pool.drain(url)
            elif action == "remove":
                self.router.forget(self.pool.remove(url).url)
            else:
                raise ValueError(f"action must be add, drain or remove, got {action!r}")
        except (ValueError, KeyError, TypeError) as e:
            await _error(
                send, 400, f"POST /admin/workers takes {{'url': ..., 'action': add|drain|remove}}: {e}"
            )
            return
        await _json(send, 200, self.status())

    async def _gateway_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        from tokenmill.router.admin import handle_admin, handle_usage
        from tokenmill.router.gateway import GatewayError

        assert self.gateway is not None
        headers = _forwarded(scope["headers"])
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            if scope["path"] == "/v1/usage":
                if scope["method"] != "GET":
                    raise GatewayError(405, "/v1/usage takes GET", "invalid_request_error")
                answer = handle_usage(self.gateway, query, headers)
            else:
                body = await _read_body(receive)
                answer = handle_admin(self.gateway, scope["method"], scope["path"], query, body, headers)
        except GatewayError as e:
            await _error(send, e.status, e.message, kind=e.kind, retry_after=e.retry_after, param=e.param)
            return
        await _json(send, answer.status, answer.body)

    def status(self) -> dict[str, Any]:
        return {
            "policy": self.router.policy,
            "imbalance": self.pool.imbalance(),
            "decisions": dict(self.router.decisions),
            "predicted_hit_tokens": self.router.predicted_hit_tokens,
            "streams_cut": self.streams_cut,
            "queues": {
                pool: {
                    "in_flight": q.in_flight,
                    "waiting": q.waiting,
                    "refused": q.refused,
                    "admitted_by_team": dict(q.admitted_by_team),
                }
                for pool, q in self._queues.items()
            },
            "workers": [
                {
                    "url": w.url,
                    "name": w.name,
                    "pool": w.pool,
                    "slots": w.slots,
                    "healthy": w.healthy,
                    "draining": w.draining,
                    "in_flight": w.in_flight,
                    "in_flight_tokens": w.in_flight_tokens,
                    "routed": w.routed,
                    "routed_tokens": w.routed_tokens,
                    "failed": w.failed,
                    "predicted_hit_tokens": w.predicted_hit_tokens,
                    "measured_hit_rate": w.measured_hit_rate,
                    "prefill_tokens_per_s": 1 / w.step_cost.seconds_per_token
                    if w.step_cost.seconds_per_token
                    else None,
                    "kv_blocks_known": self.router.kv.num_blocks(w.url),
                    "kv_events": self.keeper.kv_events is not None
                    and w.url in self.keeper.kv_events.connected,
                }
                for w in self.pool.workers
            ],
        }


class _Prefill:
    """What a routed request adds to its worker until its first byte: its prefill to the queue
    estimate and, for the kv policy, its blocks as expected there (before the worker's events
    can say so)."""

    __slots__ = ("_blocks", "_kv", "_pending", "_tokens", "_worker")

    def __init__(self, worker: Worker, tokens: int, kv: KVIndex | None, blocks: PromptBlocks | None) -> None:
        self._worker, self._tokens, self._kv, self._blocks = worker, tokens, kv, blocks
        self._pending = True
        worker.pending_prefill += tokens
        if kv is not None and blocks is not None:
            kv.expect(worker.url, blocks.hashes)

    def done(self) -> None:
        if self._pending:
            self._pending = False
            self._worker.pending_prefill -= self._tokens
            if self._kv is not None and self._blocks is not None:
                self._kv.settle(self._worker.url, self._blocks.hashes)


def _estimate_tokens(request: dict[str, Any], text: str) -> tuple[int, int]:
    """Prompt and asked output tokens, for load accounting and the gateway's reservations: a
    token per four characters, rounded up, and for chat what a template adds (role and special
    tokens: ``_TEMPLATE_TOKENS`` a message, and the assistant's header), erring high so that a
    reservation covers the prompt the worker will count."""
    prompt = request.get("prompt")
    messages = request.get("messages")
    if messages is None and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt), _asked_output(request) or _DEFAULT_OUTPUT_TOKENS  # token ids
    prompt_tokens = -(-len(text) // _CHARS_PER_TOKEN)
    if isinstance(messages, list):
        prompt_tokens += _TEMPLATE_TOKENS * (len(messages) + 1)
    return prompt_tokens, _asked_output(request) or _DEFAULT_OUTPUT_TOKENS


def _forwarded(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in _HOP_BY_HOP:
            headers[key] = value.decode("latin-1")
    return headers


def _header(raw: list[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.encode()
    for key, value in raw:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _start(status: int, headers: dict[str, str], worker: Worker) -> Message:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if k not in _HOP_BY_HOP]
    if WORKER_HEADER.decode() not in headers:
        out.append((WORKER_HEADER, worker.name.encode("latin-1")))
    if "content-length" in headers:
        out.append((b"content-length", headers["content-length"].encode()))
    return {"type": "http.response.start", "status": status, "headers": out}


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _json(
    send: Send, status: int, payload: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    retry_after: int | None = None,
    param: str | None = None,
) -> None:
    extra = [(b"retry-after", str(retry_after).encode())] if retry_after is not None else []
    await _json(send, status, _error_body(message, kind, param), extra)


def _error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, as workers send it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _body_for(worker: Worker, request: dict[str, Any], body: bytes) -> bytes:
    """The gateway's body as this worker's engine reads it: vLLM runs the lowest priority value
    first (with ``--scheduling-policy priority``), tokenmill the highest."""
    if worker.engine != "vllm" or not isinstance(request.get("priority"), int):
        return body
    return json.dumps({**request, "priority": -request["priority"]}).encode()


def _asked_output(request: dict[str, Any]) -> int | None:
    asked = request.get("max_completion_tokens", request.get("max_tokens"))
    return asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else None


@dataclass(slots=True)
class _Call:
    """One proxied request, as the steps of routing it pass it on."""

    scope: Scope
    receive: Receive
    send: Send
    request: dict[str, Any]  # the body, parsed (and rewritten by the gateway)
    body: bytes  # as it goes to the worker
    headers: dict[str, str]
    session: str | None
    text: str  # the prompt's text (prefix_index.prompt_text)
    prompt_tokens: int  # estimated
    output_tokens: int  # asked, or the default estimate
    outcome: _Outcome


class _Outcome:
    """How a request through the gateway ended, for its usage row."""

    __slots__ = ("admitted", "meter", "state", "status", "worker")

    def __init__(self, admitted: Admitted | None) -> None:
        self.admitted = admitted
        self.status: int | None = None
        self.state = "unavailable"  # ok, error (the worker's 4xx/5xx), cut, cancelled, unavailable
        self.worker: str | None = None
        self.meter: UsageMeter | None = None

    def meter_for(self, sse: bool) -> UsageMeter | None:
        if self.admitted is None:
            return None
        from tokenmill.router.usage_meter import UsageMeter

        self.meter = UsageMeter(sse, self.admitted.client_wants_usage)
        return self.meter

    def usage(self) -> Any:
        from tokenmill.router.usage_meter import Usage

        return self.meter.usage if self.meter is not None else Usage()

    def chunks(self) -> int:
        return self.meter.events if self.meter is not None else 0
