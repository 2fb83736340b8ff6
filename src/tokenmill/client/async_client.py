"""``AsyncClient``: OpenAI's familiar surface, with a queue in front that keeps workers busy, not buried.

Example, with ``tokenmill serve`` on 127.0.0.1:8000::

    import asyncio

    from tokenmill.client import AsyncClient


    async def main() -> None:
        async with AsyncClient("http://127.0.0.1:8000") as client:
            reply = await client.chat.completions.create(
                messages=[{"role": "user", "content": "Say hi"}], max_tokens=16
            )
            print(reply.choices[0].message.content)
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": "Count to five"}], max_tokens=32, stream=True
            )
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
            print()
            print(client.report().table())


    asyncio.run(main())

Every request waits its turn in the client (see ``tokenmill.client.dispatch``):
with ``max_concurrency="auto"`` (the default) the number in flight is learned
from time to first token, so a thousand ``create`` calls at once reach the
workers as a steady stream at the rate they can take; ``requests_per_minute``
and ``tokens_per_minute`` hold a quota (``no_burst=True`` spaces requests
evenly). Several base URLs spread requests by least in-flight load and set
failing ones aside. Errors raise ``tokenmill.protocol.APIError`` (``status``,
``param``, ``retry_after``) or a ``TransportError`` once retries are spent.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

from tokenmill.client.adaptive import AdaptiveLimit, LimitSettings
from tokenmill.client.dispatch import Call, Dispatcher, Reply, RetryPolicy, estimate_tokens
from tokenmill.client.endpoints import EndpointSet
from tokenmill.client.grpc_wire import GRPCWire
from tokenmill.client.monitor import Monitor, MonitorReport
from tokenmill.client.openai_types import ChatCompletion, ChatCompletionChunk, Completion
from tokenmill.client.rate_limit import Quota, RateLimiter
from tokenmill.client.wire import HTTPWire, Wire
from tokenmill.protocol.headers import PRIORITY_HEADER, PRIORITY_MAX, PRIORITY_MIN, SESSION_HEADER

T = TypeVar("T")
R = TypeVar("R")


class AsyncStream(Generic[T]):
    """The chunks of a streamed response. Leaving early (``break``, ``aclose``) aborts the request.

    ``async for`` has no hook for ``break``, so ``__aiter__`` hands out a generator that closes
    the stream when it is left: on ``break`` the loop closes it at its next turn, which aborts
    the request on the worker and frees its slot (``aclose`` does the same at once)."""

    def __init__(self, first: T, rest: AsyncIterator[Reply], parse: Any, deadline: float | None = None):
        self._first: T | None = first
        self._rest = rest
        self._parse = parse
        self._deadline = deadline  # loop time the whole stream must end by (create's timeout)

    def __aiter__(self) -> AsyncIterator[T]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[T]:
        try:
            while True:
                try:
                    chunk = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await self.aclose()

    async def __anext__(self) -> T:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._deadline is None:
            reply = await self._rest.__anext__()
        else:
            reply = await _by(self._deadline, self._rest.__anext__(), self._rest)
        return self._parse(reply.data, reply.worker)

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    def __init__(
        self,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        max_concurrency: int | Literal["auto"] = "auto",
        limit: LimitSettings | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        no_burst: bool = False,
        max_retries: int = 3,
        timeout: float | None = 600.0,
        priority: int | None = None,
        session_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        transport: Literal["http", "grpc"] = "http",
    ):
        """``base_url``: one endpoint or several (``http://host:port``, with or without ``/v1``;
        with ``transport="grpc"``, a tokenmill worker's gRPC ``host:port``).
        ``api_key``: the team's key (default ``$TOKENMILL_API_KEY``). ``max_concurrency``:
        ``"auto"`` (adaptive, tuned by ``limit``) or a fixed number of requests in flight.
        ``timeout``: longest silence within a response. ``priority`` and ``session_id``
        apply to every request unless a call sets its own."""
        if transport not in ("http", "grpc"):
            raise ValueError(f"transport={transport!r} is invalid: allowed 'http' or 'grpc'")
        _check_count("max_retries", max_retries)
        _check_positive("timeout", timeout, "a number of seconds above 0, or None for no limit")
        _check_positive("requests_per_minute", requests_per_minute, "a number above 0, or None for no limit")
        _check_positive("tokens_per_minute", tokens_per_minute, "a number above 0, or None for no limit")
        _check_priority(priority)
        _check_session(session_id)
        if limit is not None and not isinstance(limit, LimitSettings):
            raise TypeError(f"limit={limit!r} is invalid: allowed a LimitSettings, or None for the defaults")
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if transport == "grpc":
            urls = [u if u.startswith("grpc://") else f"grpc://{u}" for u in urls]
        self.endpoints = EndpointSet([_strip_v1(u) for u in urls])
        self.transport = transport
        if max_concurrency == "auto":
            concurrency: AdaptiveLimit | int = AdaptiveLimit(limit)
        else:
            allowed = f"max_concurrency={max_concurrency!r} is invalid: allowed 'auto' or an integer >= 1"
            if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, (int, str)):
                raise TypeError(allowed)
            if isinstance(max_concurrency, str) or max_concurrency < 1:
                raise ValueError(allowed)
            concurrency = max_concurrency
        key = api_key if api_key is not None else os.environ.get("TOKENMILL_API_KEY")
        _check_api_key(key, "api_key" if api_key is not None else "$TOKENMILL_API_KEY")
        if not isinstance(no_burst, bool):
            raise TypeError(f"no_burst={no_burst!r:.80} is invalid: allowed True or False")
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._timeout = timeout
        self._wires: dict[str, Wire] = {}
        self.monitor = Monitor()
        self.dispatcher = Dispatcher(
            self.endpoints,
            concurrency=concurrency,
            limiter=RateLimiter(Quota(requests_per_minute, tokens_per_minute, no_burst)),
            retry=RetryPolicy(max_retries=max_retries),
            monitor=self.monitor,
            wire=self._wire,
        )
        self.priority = priority
        self.session_id = session_id
        self.chat = _Chat(self)
        self.completions = AsyncCompletions(self)

    @property
    def concurrency_limit(self) -> int:
        """Requests the client lets into flight now."""
        return self.dispatcher.current_limit()

    def report(self) -> MonitorReport:
        """Requests, tokens, latency and errors per endpoint and per worker so far."""
        return self.monitor.report(self.concurrency_limit)

    async def aclose(self) -> None:
        await self.monitor.stop()
        for wire in self._wires.values():
            await wire.aclose()
        self._wires.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _wire(self, url: str) -> Wire:
        wire = self._wires.get(url)
        if wire is None:
            self.monitor.start(self.dispatcher.queue_state)
            if self.transport == "grpc":
                wire = GRPCWire(url, self._headers, self._timeout)
            else:
                wire = HTTPWire(url, self._headers, self._timeout)
            self._wires[url] = wire
        return wire

    def prepare_call(
        self,
        path: str,
        body: dict[str, Any],
        priority: int | None = None,
        session_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Call:
        """A request for the dispatcher, with the client's priority, session and headers. The
        body's own fields are not checked here: the server judges them, and its 400 names the field."""
        _check_priority(priority)
        _check_session(session_id)
        headers = {k.lower(): v for k, v in (extra_headers or {}).items()}
        priority = priority if priority is not None else self.priority
        if priority is not None:
            body["priority"] = priority
            headers[PRIORITY_HEADER] = str(priority)
        session = session_id if session_id is not None else self.session_id
        if session is not None:
            headers[SESSION_HEADER] = session
        return Call(path, body, bool(body.get("stream")), estimate_tokens(body), headers, session)

    async def _create(self, call: Call, parse: Any, timeout: float | None = None) -> Any:
        """``timeout``: seconds the whole call may take (a stream: to its last chunk)."""
        _check_positive("timeout", timeout, "a number of seconds above 0, or None for no limit")
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        if not call.stream:
            request = self.dispatcher.request(call)
            reply = await (request if deadline is None else _by(deadline, request))
            return parse(reply.data, reply.worker)
        replies = self.dispatcher.replies(call)
        try:
            first_reply = replies.__anext__()  # errors before the first chunk raise here
            first = await (first_reply if deadline is None else _by(deadline, first_reply, replies))
        except StopAsyncIteration:
            raise RuntimeError("the server ended the stream before any chunk") from None
        return AsyncStream(parse(first.data, first.worker), replies, parse, deadline)


class AsyncChatCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        stream: bool = False,
        priority: int | None = None,
        session_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """POST /v1/chat/completions; ``params`` are OpenAI's fields (``max_tokens``, ``temperature``,
        ``stop``, ...) and tokenmill's (``top_k``, ``min_p``, ``ignore_eos``, ``cache_salt``, ...).
        ``timeout``: seconds this call may take, to a stream's last chunk; past it the request is
        aborted and TimeoutError raised."""
        body = _body(model, stream, params, extra_body)
        body["messages"] = _messages(messages)
        call = self._client.prepare_call("/v1/chat/completions", body, priority, session_id, extra_headers)
        parse = ChatCompletionChunk.parse if stream else ChatCompletion.parse
        return await self._client._create(call, parse, timeout)


class AsyncCompletions:
    def __init__(self, client: AsyncClient):
        self._client = client

    async def create(
        self,
        *,
        prompt: str | list[int],
        model: str | None = None,
        stream: bool = False,
        priority: int | None = None,
        session_id: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> Completion | AsyncStream[Completion]:
        """POST /v1/completions; a prompt is text or token ids. ``timeout``: as for chat."""
        body = _body(model, stream, params, extra_body)
        body["prompt"] = prompt
        call = self._client.prepare_call("/v1/completions", body, priority, session_id, extra_headers)
        return await self._client._create(call, Completion.parse, timeout)


class _Chat:
    def __init__(self, client: AsyncClient):
        self.completions = AsyncChatCompletions(client)


def _body(
    model: str | None, stream: bool, params: dict[str, Any], extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    body.update(extra or {})
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    return body


async def _by(deadline: float, step: Awaitable[R], stream: AsyncIterator[Reply] | None = None) -> R:
    """``step``, unless loop time ``deadline`` passes first: then it is cancelled (closing its
    connection, which aborts the request on the worker), the stream closed, and TimeoutError
    raised."""
    try:
        async with asyncio.timeout_at(deadline):
            return await step
    except TimeoutError:
        if stream is not None:
            await stream.aclose()  # type: ignore[attr-defined]
        raise TimeoutError("the call's timeout passed; the request was aborted") from None


def _messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(
            f"messages={messages!r:.80} is invalid: allowed a list of messages, "
            "each a mapping such as {'role': 'user', 'content': 'Say hi'}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(
                f"messages[{i}]={m!r:.80} is invalid: allowed a mapping such as "
                "{'role': 'user', 'content': 'Say hi'}"
            )
    return [dict(m) for m in messages]


def _check_count(name: str, value: object) -> None:
    allowed = f"{name}={value!r} is invalid: allowed an integer >= 0"
    if isinstance(value, bool) or not isinstance(value, int):  # not 1.5, not "3"
        raise TypeError(allowed)
    if value < 0:
        raise ValueError(allowed)


def _check_positive(name: str, value: object, allowed: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} is invalid: allowed {allowed}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def _check_priority(priority: object) -> None:
    if priority is None:
        return
    allowed = (
        f"priority={priority!r} is invalid: allowed an integer from {PRIORITY_MIN} to {PRIORITY_MAX} "
        "(higher is served first), or None"
    )
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(allowed)
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(allowed)


def _check_session(session_id: object) -> None:
    if session_id is None:
        return
    allowed = f"session_id={session_id!r:.80} is invalid: allowed a non-empty one-line latin-1 text, or None"
    if not isinstance(session_id, str):
        raise TypeError(allowed)
    if not session_id or not session_id.isprintable() or max(session_id) > "\xff":  # an HTTP header's value
        raise ValueError(allowed)


def _check_api_key(key: object, name: str) -> None:
    # The key is never echoed: error messages end up in logs.
    allowed = f"{name} is invalid: allowed one line of latin-1 text (sent as an HTTP header), or None"
    if key is not None and not isinstance(key, str):
        raise TypeError(f"{allowed}; got a {type(key).__name__}")
    if key and (not key.isprintable() or max(key) > "\xff"):
        raise ValueError(allowed)


def _strip_v1(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url
