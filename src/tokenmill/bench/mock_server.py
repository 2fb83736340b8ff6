"""An OpenAI-compatible server with exact timings, for calibrating clients and testing reports.

``tokenmill bench mock-server --ttft 0.2 --itl 0.02 --output-tokens 128`` answers
``/v1/completions`` and ``/v1/chat/completions`` (streamed or not) with the
first token ``ttft`` seconds after the request arrived and one more every
``itl`` seconds, each token a word; a request's ``max_tokens`` (or
``max_completion_tokens``) sets its length (up to ``MAX_TOKENS``), ``--output-tokens`` otherwise. Its
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
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.bench.mock_http import Connection, Responder
from tokenmill.bench.vocabulary import WORDS

# The longest answer it makes, as a real server's context bounds it: the text of a larger one is
# built in memory (a whole answer at once), so 10**12 would never come back.
MAX_TOKENS = 1 << 20


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
        if self.output_tokens > MAX_TOKENS:
            raise ValueError(f"output_tokens must be from 0 to {MAX_TOKENS}, got {self.output_tokens}")


class MockServer:
    """Start with ``await server.start(host, port)``; ``server.url`` then says where it listens."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self._vocab: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
        self._words: list[str] = list(WORDS)
        self.num_requests = 0  # completion requests seen
        self.num_answered = 0  # ... and answered in full
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self.url = ""
        self.worker_id = ""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), host, port, backlog=4096)
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
        for connection in list(self.connections):
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
        self, method: str, path: str, body: bytes, respond: Responder, authorization: str = ""
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

    def _tokenize(self, req: dict[str, Any], respond: Responder) -> None:
        if "messages" in req:
            text = " ".join(str(m.get("content", "")) for m in req["messages"])
        else:
            text = str(req.get("prompt", ""))
        ids = self.encode(text)
        respond.json(200, {"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})

    async def _complete(self, req: dict[str, Any], chat: bool, respond: Responder) -> None:
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
        integer = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
        if not integer or not 1 <= max_tokens <= MAX_TOKENS:
            respond.error(
                400, f"max_tokens must be an integer from 1 to {MAX_TOKENS}, got {max_tokens!r}", "max_tokens"
            )
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

    async def _stream(self, reply: _Reply, arrived: float, respond: Responder, cut_at: int | None) -> bool:
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
