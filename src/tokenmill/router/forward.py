"""One routed request at one worker: the request sent, the answer streamed back to the client.

The worker's head and body reach the client as the worker sends them, with
``x-tokenmill-worker`` added when the worker does not send it. A worker that
fails before its first byte lets the request go to another; one that fails
mid-stream ends the client's stream with an SSE error event and ``data:
[DONE]``; a client that goes away closes the worker's stream, so the worker
aborts the request. Behind the gateway, the request's usage row is on disk
before the client gets a byte, and the answer passes through its usage meter.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Receive, Send

from tokenmill.client import HTTPTransport, TransportError
from tokenmill.protocol.headers import WORKER_HEADER
from tokenmill.router.asgi import HOP_BY_HOP, error_body, send_error, wait_for_disconnect
from tokenmill.router.call import Outcome, Prefill
from tokenmill.router.policies import RouteRequest
from tokenmill.router.workers import Worker, WorkerPool

if TYPE_CHECKING:
    from tokenmill.router.ledger import Ledger
    from tokenmill.router.usage_meter import UsageMeter

logger = logging.getLogger(__name__)


class Forwarder:
    def __init__(
        self, pool: WorkerPool, transport: Callable[[Worker], HTTPTransport], ledger: Ledger | None
    ) -> None:
        self.pool = pool
        self._transport = transport
        self._ledger = ledger  # the gateway's, if any
        self.streams_cut = 0  # streams that ended with an error event because their worker failed

    async def forward(
        self,
        worker: Worker,
        path: str,
        body: bytes,
        headers: dict[str, str],
        route: RouteRequest,
        prefill: Prefill,
        receive: Receive,
        send: Send,
        outcome: Outcome,
    ) -> bool:
        """Send the request to ``worker`` and stream its answer back. False if the worker failed
        before its first byte (nothing reached the client: the request may go elsewhere)."""
        tokens, output, sequences = route.tokens, route.output_tokens, route.sequences
        self.pool.started(worker, tokens, output, sequences)
        outcome.worker = worker.name  # the worker has the request (for the usage row, however it ends)
        started = False
        try:
            async with self._transport(worker).stream(
                "POST", path, content=body, headers=headers
            ) as response:
                if response.status >= 500:
                    self.pool.failed(worker)
                else:
                    self.pool.succeeded(worker)
                    if response.status < 400:
                        worker.routed_tokens += tokens
                    if WORKER_HEADER in response.headers and worker.name == worker.url:
                        worker.name = response.headers[WORKER_HEADER]
                if outcome.admitted is not None and not await self._usage_recorded(outcome, send):
                    return True  # leaving closes the worker's stream: it stops generating
                sse = response.headers.get("content-type", "").startswith("text/event-stream")
                await send(_start(response.status, response.headers, worker, sse))
                started = True
                outcome.status, outcome.worker = response.status, worker.name
                outcome.state = "ok" if response.status < 400 else "error"
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
            self.pool.finished(worker, tokens, output, sequences)
            prefill.done()

    async def _usage_recorded(self, outcome: Outcome, send: Send) -> bool:
        """The gateway's request's usage row is on disk, before its client gets a byte; else a 503.
        The row was gathered as the request was forwarded and is committed with others soon after
        (``router/ledger.py``), so this rarely waits long: the commit overlaps the worker's round
        trip instead of delaying the request."""
        assert self._ledger is not None and outcome.admitted is not None
        try:
            await self._ledger.durable(outcome.admitted.row)
            return True
        except Exception as e:  # the row stays queued for the next commit
            logger.error("usage of %s not recorded (%s): answering 503", outcome.admitted.request_id, e)
            outcome.status, outcome.state = 503, "ledger_error"
            await send_error(
                send,
                503,
                "usage could not be recorded; retry shortly",
                kind="service_unavailable",
                retry_after=1,
            )
            return False

    async def _relay(
        self,
        response: Any,
        sse: bool,
        receive: Receive,
        send: Send,
        prefill: Prefill,
        meter: UsageMeter | None,
        outcome: Outcome,
    ) -> None:
        """The worker's body to the client as it comes (through the gateway's usage meter, if any);
        stops (closing the worker's stream, which aborts the request there) if the client goes
        away."""
        # Only a stream needs watching: a whole response comes in one piece right after its head.
        gone = None
        if sse:
            gone = asyncio.ensure_future(wait_for_disconnect(receive))
            # A client that leaves while the worker is silent (queued, a long prefill) is acted on
            # at once, not at the worker's next chunk: the read waiting for it is given up, which
            # frees the request's slots and aborts it on the worker.
            gone.add_done_callback(lambda f: f.cancelled() or response.abandon("the client went away"))
        try:
            while (item := await response.read_chunk(coalesce=True)) is not None:
                data = item[0]
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
            if gone is not None and gone.done() and not gone.cancelled():
                outcome.state = "cancelled"  # (the read given up above): nobody to tell
                return
            self.streams_cut += 1
            if sse:  # the client sees why its stream ended, then the end
                error = json.dumps(error_body(f"the worker failed mid-stream: {e}", "server_error"))
                tail = f"data: {error}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            # A whole answer is left unended: the server then closes the connection, the one way
            # to tell the client it is cut (an end would pass half a JSON body off as complete,
            # or leave the client waiting for the rest of a content-length on a kept-alive one).
            raise
        finally:
            if gone is not None:
                gone.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# The router's server adds its own: passed on too, the client would get each twice.
_SERVER_HEADERS = HOP_BY_HOP | {"date", "server"}


def _start(status: int, headers: dict[str, str], worker: Worker, sse: bool) -> Message:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if k not in _SERVER_HEADERS]
    if WORKER_HEADER not in headers:
        out.append((WORKER_HEADER.encode(), worker.name.encode("latin-1")))
    # A stream's length is not kept: the gateway's meter may drop its usage chunk, and a body short
    # of its stated length leaves a kept-alive client waiting (streams go out chunked instead).
    if "content-length" in headers and not sse:
        out.append((b"content-length", headers["content-length"].encode()))
    return {"type": "http.response.start", "status": status, "headers": out}
