"""An OpenAI-compatible server with exact timings, for calibrating clients and testing reports.

``tokenmill bench mock-server --ttft 0.2 --itl 0.02 --output-tokens 128`` answers
``/v1/completions`` and ``/v1/chat/completions`` (streamed or not) with the
first token ``ttft`` seconds after the request arrived and one more every
``itl`` seconds, each token a word; a request's ``max_tokens`` (or
``max_completion_tokens``) sets its length, ``--output-tokens`` otherwise. Its
tokenizer is whitespace: a prompt has as many tokens as words, and
``/tokenize`` and ``/detokenize`` agree with that, so synthetic prompts of exact
lengths can be built against it. Every response carries ``x-tokenmill-worker``.

Faults on purpose, for testing what a client reports: ``--fail-every N`` answers
every Nth request with a 500, ``--cut-every N`` closes every Nth stream halfway,
``--crash-after N`` dies once it has answered N requests (stops listening and
drops every connection, cutting the responses in flight, as a killed server does).
``--empty-every N`` sends every Nth token with empty text (as a server does for a
token that ends inside a UTF-8 character): the usage counts it, the text does not.
Refusals, as a real server gives them: ``--api-key KEY`` answers 401 to a
request without ``Authorization: Bearer KEY``; ``--strict-model`` answers 404
``model_not_found`` to a request naming another model than ``--model``.

Built on asyncio and httptools rather than a web framework: with ``--ttft 0
--itl 0`` it is the "instant server" a client's ceiling is measured against,
so it must cost far less per request than the client under test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools

from tokenmill.bench.vocabulary import WORDS

logger = logging.getLogger(__name__)

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


@dataclass(frozen=True)
class MockConfig:
    ttft: float = 0.2  # seconds from the request's arrival to its first token
    itl: float = 0.02  # seconds between tokens
    output_tokens: int = 128  # when the request gives no max_tokens
    model: str = "mock"
    worker_id: str | None = None  # x-tokenmill-worker; default mock-<port>
    fail_every: int = 0  # every Nth completion request gets a 500 (0: never)
    cut_every: int = 0  # every Nth stream is cut halfway (0: never)
    crash_after: int = 0  # die once this many completion requests were answered (0: never)
    empty_every: int = 0  # every Nth token streams with empty text (0: never)
    api_key: str | None = None  # refuse (401) requests without Authorization: Bearer api_key
    strict_model: bool = False  # refuse (404) requests naming another model

    def __post_init__(self) -> None:
        for name in ("ttft", "itl"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {getattr(self, name)}")
        for name in ("output_tokens", "fail_every", "cut_every", "crash_after", "empty_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class MockServer:
    """Start with ``await server.start(host, port)``; ``server.url`` then says where it listens."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._vocab: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
        self._words: list[str] = list(WORDS)
        self.num_requests = 0  # completion requests seen
        self.num_answered = 0  # ... and answered in full
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.url = ""
        self.worker_id = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=4096)
        bound = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{host}:{bound}"
        self.worker_id = self.config.worker_id or f"mock-{bound}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def crash(self) -> None:
        """Die as a killed process does: stop listening and drop every connection unanswered
        (what was already written still goes out)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()

    async def __aenter__(self) -> MockServer:
        if self._server is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the whitespace tokenizer -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self._vocab:
                self._vocab[word] = len(self._words)
                self._words.append(word)
            ids.append(self._vocab[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._words[i] for i in ids if 0 <= i < len(self._words))

    # -- requests -----------------------------------------------------------------------

    async def handle(
        self, method: str, path: str, body: bytes, respond: _Responder, authorization: str = ""
    ) -> None:
        route = path.split("?", 1)[0]
        key = self.config.api_key
        if key is not None and route not in ("/health", "/ready") and authorization != f"Bearer {key}":
            respond.json(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})
            return
        if route in ("/health", "/ready"):
            respond.json(200, {"status": "ok"})
        elif route == "/v1/models":
            respond.json(200, {"object": "list", "data": [{"id": self.config.model, "object": "model"}]})
        elif route in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            if method != "POST":
                respond.error(405, f"{route} takes POST", None)
                return
            try:
                req = json.loads(body or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                respond.error(400, f"the body is not valid JSON: {e}", None)
                return
            model = req.get("model")
            if self.config.strict_model and route != "/detokenize" and model != self.config.model:
                message = f"model {model!r} does not exist: this worker serves {self.config.model!r}"
                error = {"message": message, "type": "invalid_request_error", "param": "model"}
                respond.json(404, {"error": {**error, "code": "model_not_found"}})
                return
            if route == "/tokenize":
                self._tokenize(req, respond)
            elif route == "/detokenize":
                respond.json(200, {"prompt": self.decode([int(t) for t in req.get("tokens", [])])})
            else:
                await self._complete(req, chat=route.endswith("chat/completions"), respond=respond)
        else:
            respond.error(404, f"no route {route}", None)

    def _tokenize(self, req: dict[str, Any], respond: _Responder) -> None:
        if "messages" in req:
            text = " ".join(str(m.get("content", "")) for m in req["messages"])
        else:
            text = str(req.get("prompt", ""))
        ids = self.encode(text)
        respond.json(200, {"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})

    async def _complete(self, req: dict[str, Any], chat: bool, respond: _Responder) -> None:
        arrived = asyncio.get_running_loop().time()
        self.num_requests += 1
        n = self.num_requests
        cfg = self.config
        if cfg.fail_every and n % cfg.fail_every == 0:
            respond.error(500, "injected failure (--fail-every)", None)
            return
        max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
        if max_tokens is None:
            max_tokens = cfg.output_tokens
        if not isinstance(max_tokens, int) or max_tokens < 1:
            respond.error(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
            return
        if chat:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                respond.error(400, "messages must be a non-empty list", "messages")
                return
            prompt_tokens = sum(
                len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict)
            )
        else:
            prompt = req.get("prompt", "")
            prompt_tokens = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
        stream = bool(req.get("stream"))
        opts = req.get("stream_options") or {}
        reply = _Reply(
            rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}",
            model=req.get("model") or cfg.model,
            chat=chat,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            include_usage=bool(opts.get("include_usage")),
            continuous=bool(opts.get("continuous_usage_stats")),
        )
        cut_at = max_tokens // 2 if cfg.cut_every and n % cfg.cut_every == 0 else None
        if stream:
            if not await self._stream(reply, arrived, respond, cut_at):
                return
        else:
            await _sleep_until(arrived + cfg.ttft + (max_tokens - 1) * cfg.itl)
            respond.json(200, reply.whole(self._text(max_tokens)))
        self.num_answered += 1
        if cfg.crash_after and self.num_answered == cfg.crash_after:
            self.crash()

    async def _stream(self, reply: _Reply, arrived: float, respond: _Responder, cut_at: int | None) -> bool:
        """Stream the reply; False if it was cut (on purpose, or the client left)."""
        cfg = self.config
        respond.start_stream()
        for i in range(reply.max_tokens):
            await _sleep_until(arrived + cfg.ttft + i * cfg.itl)
            if cut_at is not None and i == cut_at:
                respond.abort()
                return False
            if respond.closed:
                return False
            empty = cfg.empty_every and (i + 1) % cfg.empty_every == 0
            respond.event(reply.chunk(i, "" if empty else self._words[i % len(WORDS)] + " "))
        if reply.include_usage:
            respond.event(reply.usage_chunk())
        respond.event_raw(b"[DONE]")
        respond.end_stream()
        return True

    def _text(self, n: int) -> str:
        return " ".join(self._words[i % len(WORDS)] for i in range(n)) + " "


@dataclass
class _Reply:
    rid: str
    model: str
    chat: bool
    prompt_tokens: int
    max_tokens: int
    include_usage: bool
    continuous: bool

    def usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def chunk(self, i: int, text: str) -> dict[str, Any]:
        last = i == self.max_tokens - 1
        finish = "length" if last else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if i == 0 else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        out: dict[str, Any] = {
            "id": self.rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model,
        }
        out["choices"] = [choice]
        if self.continuous:
            out["usage"] = self.usage(i + 1)
        return out

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": self.usage(self.max_tokens)}

    def whole(self, text: str) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text}
            kind = "text_completion"
        choice.update(logprobs=None, finish_reason="length")
        return {**self._envelope(kind), "choices": [choice], "usage": self.usage(self.max_tokens)}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": int(time.time()), "model": self.model}


async def _sleep_until(when: float) -> None:
    delay = when - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


class _Responder:
    """Writes one response on a connection: whole, or as a chunked event stream."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.closed = False

    def json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        head = self._head(status, b"application/json") + b"content-length: %d\r\n\r\n" % len(body)
        self._connection.write(head + body)

    def error(self, status: int, message: str, param: str | None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def start_stream(self) -> None:
        self._connection.write(self._head(200, b"text/event-stream") + b"transfer-encoding: chunked\r\n\r\n")

    def event(self, payload: dict[str, Any]) -> None:
        self.event_raw(json.dumps(payload, separators=(",", ":")).encode())

    def event_raw(self, data: bytes) -> None:
        frame = b"data: " + data + b"\n\n"
        self._connection.write(b"%x\r\n%s\r\n" % (len(frame), frame))

    def end_stream(self) -> None:
        self._connection.write(b"0\r\n\r\n")

    def abort(self) -> None:
        self.closed = True
        self._connection.close()

    def _head(self, status: int, content_type: bytes) -> bytes:
        worker = self._connection.server.worker_id.encode()
        reason = _REASONS.get(status, "Unknown").encode()
        return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\nx-tokenmill-worker: %s\r\n" % (
            status,
            reason,
            content_type,
            worker,
        )


class _Connection(asyncio.Protocol):
    """One client connection: parses requests with httptools and answers them one at a time."""

    def __init__(self, server: MockServer) -> None:
        self.server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._authorization = ""
        self._queue: asyncio.Queue[tuple[str, str, bytes, str]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._responder: _Responder | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self.server._connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._answer_in_order())

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self.server._connections.discard(self)
        if self._responder is not None:
            self._responder.closed = True
        if self._worker is not None:
            self._worker.cancel()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._authorization = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode()
        request = (method, self._url.decode("latin-1"), b"".join(self._body), self._authorization)
        self._queue.put_nowait(request)
        self._url, self._body, self._authorization = b"", [], ""

    async def _answer_in_order(self) -> None:
        handle: Callable[..., Any] = self.server.handle
        while True:
            method, path, body, authorization = await self._queue.get()
            self._responder = _Responder(self)
            try:
                await handle(method, path, body, self._responder, authorization)
            except Exception:
                logger.exception("mock server failed on %s %s", method, path)
                self.close()
                return

    def write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
