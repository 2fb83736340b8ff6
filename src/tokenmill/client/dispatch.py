"""The client-side queue: every request passes here on its way to an endpoint.

In order, a request waits for: a pause a server asked for (``Retry-After``), a
slot under the concurrency limit (fixed, or adaptive: see ``adaptive.py``), and
room in the quotas (``rate_limit.py``); then it goes to the endpoint with the
fewest requests in flight. Its slot is held until its last byte.

Retries are safe only while nothing reached the caller: a request is retried
(after a jittered, growing backoff, or the server's ``Retry-After``) on a
connection failure, a timeout, 408, 409, 429, 500, 502, 503 or 504, and only until its first
chunk has been handed over; after that, a failure is the caller's to see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenmill.client.adaptive import AdaptiveLimit
from tokenmill.client.endpoints import Endpoint, EndpointSet
from tokenmill.client.gate import ConcurrencyGate
from tokenmill.client.http_errors import ConnectError, ReadTimeout, TransportError
from tokenmill.client.monitor import Monitor
from tokenmill.client.rate_limit import RateLimiter
from tokenmill.client.wire import Wire
from tokenmill.protocol.errors import APIError

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 3
    backoff_s: float = 0.5  # first wait; doubles per retry, with jitter
    max_backoff_s: float = 20.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries} is invalid: allowed 0 or more")

    def wait(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after or 0.0)


@dataclass(frozen=True, slots=True)
class Call:
    """One OpenAI request: where it goes, what it says, and what it may cost."""

    path: str
    body: dict[str, Any]
    stream: bool
    tokens: int  # prompt estimate + max_tokens: what the quotas reserve
    headers: Mapping[str, str] = field(default_factory=dict)
    session: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response body, or one streamed chunk, with where it came from."""

    data: dict[str, Any]
    worker: str | None
    endpoint: str


class Dispatcher:
    def __init__(
        self,
        endpoints: EndpointSet,
        *,
        concurrency: AdaptiveLimit | int,
        limiter: RateLimiter,
        retry: RetryPolicy,
        monitor: Monitor,
        wire: Callable[[str], Wire],
    ):
        self.endpoints = endpoints
        self.adaptive = concurrency if isinstance(concurrency, AdaptiveLimit) else None
        self._fixed = concurrency if isinstance(concurrency, int) else 0
        if self.adaptive is None and self._fixed < 1:
            raise ValueError(f"max_concurrency={concurrency!r} is invalid: allowed 'auto' or an integer >= 1")
        self.gate = ConcurrencyGate(self.current_limit)
        self.limiter = limiter
        self.retry = retry
        self.monitor = monitor
        self._wire = wire

    def queue_state(self) -> tuple[bool, bool]:
        """(starved, backlogged): free slots and nothing waiting for them; requests waiting."""
        waiting = self.gate.waiting
        return waiting == 0 and self.gate.in_flight < self.current_limit(), waiting > 0

    def current_limit(self) -> int:
        """Requests allowed in flight now."""
        return self.adaptive.limit if self.adaptive else self._fixed

    async def request(self, call: Call) -> Reply:
        """Send a request and return its whole response (``call.stream``: its first chunk)."""
        replies = self.replies(call)
        try:
            first = await replies.__anext__()
            if not call.stream:
                # Nothing more comes: run the request to its end here, so it is recorded and its
                # slot is free before the caller sees the reply.
                async for _ in replies:
                    pass
            return first
        except StopAsyncIteration:
            raise APIError(502, "the server sent an empty response", "api_error") from None
        finally:
            await replies.aclose()

    async def replies(self, call: Call) -> AsyncIterator[Reply]:
        """The response (``call.stream``: each SSE chunk), retried while that is safe."""
        attempt = 0
        while True:
            attempt += 1
            handed_over = False
            try:
                # Closed here, not left to the loop's finalizer: when the caller closes this
                # generator, the attempt's slot, quota and record must be settled before it returns.
                async with contextlib.aclosing(self._attempt(call)) as attempt_replies:
                    async for reply in attempt_replies:
                        handed_over = True
                        yield reply
                return
            except (APIError, TransportError) as e:
                retry_after = e.retry_after if isinstance(e, APIError) else None
                if handed_over or not _retryable(e) or attempt > self.retry.max_retries:
                    raise
                if isinstance(e, APIError) and e.status in OVERLOAD_STATUS:
                    # Its endpoint waits out the Retry-After (``_wait_for_pause``); another may not.
                    retry_after = None
                wait = self.retry.wait(attempt, retry_after)
                logger.debug("retrying %s in %.2f s after %s", call.path, wait, e)
                await asyncio.sleep(wait)

    async def _attempt(self, call: Call) -> AsyncIterator[Reply]:
        await self._wait_for_pause()
        await self.gate.acquire()
        endpoint: Endpoint | None = None
        started = time.perf_counter()
        ttft: float | None = None
        usage: dict[str, Any] | None = None
        streamed = 0  # content chunks: the output tokens of a stream that sends no usage
        worker: str | None = None
        error: str | None = None
        busy_for: float | None = None  # a 429's or 503's Retry-After: the endpoint waits that long
        complete = False  # the whole response is in: closing the generator now is no failure
        reserved = False
        try:
            await self.limiter.acquire(call.tokens)
            reserved = True
            endpoint = self.endpoints.pick(call.session)
            if self.adaptive:
                self.adaptive.note_in_flight(self.gate.in_flight)
            async with self._wire(endpoint.url).open(
                call.path, call.body, call.stream, call.headers
            ) as exchange:
                worker = exchange.worker
                async for message in exchange.messages():
                    data = message.data
                    if data.get("usage"):
                        usage = data["usage"]
                    if not call.stream:
                        # No first token to time: the latency per output token shows queueing as
                        # well (a request that waited for a slot takes twice as long per token),
                        # whatever the output lengths.
                        per_token = (message.time - started) / max(1, _usage_counts(usage)[1])
                        self._latency_sample(per_token)
                        complete = True
                    elif content := _content_chunks(data):
                        streamed += content
                        if ttft is None:
                            ttft = message.time - started
                            self._latency_sample(ttft)
                    yield Reply(data, worker, endpoint.url)
                complete = True
        except BaseException as e:
            if not complete:
                error = _kind(e)
                if isinstance(e, APIError) and e.status in OVERLOAD_STATUS:
                    busy_for = e.retry_after if e.retry_after is not None else 1.0
                self._on_failure(e)
                if endpoint is not None and isinstance(e, (APIError, TransportError)):
                    e.endpoint = endpoint.url  # type: ignore[attr-defined]  # for messages that name it
            raise
        finally:
            latency = time.perf_counter() - started
            self.gate.release()
            if reserved:
                used = _used_tokens(usage, call.tokens)
                self.limiter.settle(call.tokens, used)
            if endpoint is not None:
                self.endpoints.done(
                    endpoint,
                    failed=error in ("connect", "timeout", "server_error", "unavailable"),
                    unreachable=error == "connect",
                    busy_for=busy_for,
                )
                prompt, completion = _usage_counts(usage) if usage else (0, streamed)
                self.monitor.record(
                    endpoint.url,
                    worker,
                    ttft=ttft,
                    latency=latency,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    error=error,
                )

    def _latency_sample(self, seconds: float) -> None:
        if self.adaptive:
            before = self.adaptive.limit
            self.adaptive.on_latency(seconds)
            if self.adaptive.limit > before:
                self.gate.wake()

    def _on_failure(self, e: BaseException) -> None:
        overload = isinstance(e, ReadTimeout) or (isinstance(e, APIError) and e.status in OVERLOAD_STATUS)
        if overload and self.adaptive:
            self.adaptive.on_overload()

    async def _wait_for_pause(self) -> None:
        """While every endpoint asked to be left alone (429, 503 with Retry-After), wait: one
        endpoint's overload pauses the client only when no other can take the request."""
        while (wait := self.endpoints.wait_s()) > 0:
            await asyncio.sleep(wait)


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens (about 4 characters each, erring high) plus the most the reply may use.

    Never raises: a field of the wrong type or value is the server's to judge (its 400 names the
    field), so the estimate takes a default for it and the request goes."""
    prompt = body.get("prompt")
    messages = body.get("messages")
    if isinstance(messages, list):
        text = "".join(str(m.get("content") or "") if isinstance(m, dict) else str(m) for m in messages)
        prompt_tokens = len(text) // 4 + 6 * len(messages)
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt_tokens = len(prompt)
    else:
        prompt_tokens = len(str(prompt or messages or "")) // 4 + 1
    limit = _whole(body.get("max_completion_tokens")) or _whole(body.get("max_tokens")) or 256
    return prompt_tokens + limit * (_whole(body.get("n")) or 1)


def _whole(value: Any) -> int:
    """``value`` as a positive whole number of tokens, or 0 for anything else ("abc", NaN, -1, a list)."""
    if type(value) is int:  # not bool
        return max(0, value)
    if type(value) is float and math.isfinite(value):
        return max(0, int(value))
    return 0


def _content_chunks(chunk: dict[str, Any]) -> int:
    """The choices of a streamed chunk that carry text: about one token each."""
    count = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta.get("content") if isinstance(delta, dict) else choice.get("text"):
            count += 1
    return count


def _retryable(e: BaseException) -> bool:
    if isinstance(e, APIError):
        return e.status in RETRYABLE_STATUS
    return isinstance(e, TransportError)


def _kind(e: BaseException) -> str:
    if isinstance(e, APIError):
        if e.status == 429:
            return "rate_limited"
        if e.status == 503:
            return "unavailable"
        return "server_error" if e.status >= 500 else "client_error"
    if isinstance(e, ConnectError):
        return "connect"
    if isinstance(e, (ReadTimeout, TimeoutError)):
        return "timeout"
    if isinstance(e, TransportError):
        return "stream_cut"
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    return "other"


def _usage_counts(usage: Mapping[str, Any] | None) -> tuple[int, int]:
    """(prompt, completion) tokens of a server's usage; a count that is not a number counts 0."""
    if not isinstance(usage, Mapping):
        return 0, 0
    return _whole(usage.get("prompt_tokens")), _whole(usage.get("completion_tokens"))


def _used_tokens(usage: Mapping[str, Any] | None, reserved: int) -> int:
    if not usage or not isinstance(usage, Mapping):
        return reserved  # unknown: keep the reservation
    return _whole(usage.get("total_tokens")) or sum(_usage_counts(usage))
