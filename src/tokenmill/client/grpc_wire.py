"""OpenAI requests over a tokenmill worker's gRPC ``Generate``, answered in OpenAI's shapes.

The SDK's calls stay the same whichever wire carries them: a chat request sends
its messages (the worker renders its chat template, as its HTTP endpoint does),
a completion its text or token ids; sampling fields map one to one. The answer
comes back as the JSON objects the HTTP API would send (``chat.completion``,
``chat.completion.chunk``, ``text_completion``), so the same parsers serve both.
Fields gRPC does not carry (OpenAI logprobs with token strings, tools, ...)
are refused with a 400 naming them rather than dropped.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from tokenmill.client.grpc_client import to_api_error
from tokenmill.client.grpc_messages import GenerationChunk, build_request, to_chunk
from tokenmill.client.http_errors import ConnectError
from tokenmill.client.wire import Message
from tokenmill.protocol import generation_pb2_grpc as pb_grpc
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import ERROR_TYPE_METADATA, WORKER_HEADER

# Body fields with the same name and meaning on the wire.
_SAME = (
    "temperature", "top_p", "top_k", "min_p", "seed", "n", "min_tokens", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "stop", "stop_token_ids", "ignore_eos",
    "include_stop_str_in_output", "skip_special_tokens", "model", "cache_salt",
)  # fmt: skip
_HANDLED = {
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "priority",
    "stream",
    "stream_options",
    "user",
}


class GRPCWire:
    def __init__(self, target: str, headers: Mapping[str, str], timeout: float | None):
        self.url = target
        self._target = target.removeprefix("grpc://")
        self._metadata = tuple((k, v) for k, v in headers.items() if k not in ("host", "content-type"))
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GenerationStub | None = None

    @contextlib.asynccontextmanager
    async def open(
        self, path: str, body: dict[str, Any], stream: bool, headers: Mapping[str, str]
    ) -> AsyncIterator[GRPCExchange]:
        chat = path.endswith("/chat/completions")
        request = build_request(_prompt(body, chat), None, body.get("priority"), _options(body))  # type: ignore[arg-type]
        metadata = self._metadata + tuple((k, v) for k, v in headers.items())
        rpc = self._get_stub().Generate(request, metadata=metadata)
        try:
            try:
                initial = await rpc.initial_metadata()
            except grpc.RpcError as exc:
                raise _error(exc, self.url) from exc
            # Every tokenmill worker names itself first thing; no name means nobody answered
            # (the call's error comes with the first read).
            worker = dict(initial or ()).get(WORKER_HEADER)
            yield GRPCExchange(rpc, chat, stream, str(body.get("model") or ""), worker, self.url)
        finally:
            rpc.cancel()  # a no-op once the stream ended; otherwise the worker aborts the request

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _get_stub(self) -> pb_grpc.GenerationStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._target)
            self._stub = pb_grpc.GenerationStub(self._channel)
        return self._stub


class GRPCExchange:
    def __init__(self, rpc: Any, chat: bool, stream: bool, model: str, worker: str | None, url: str):
        self._rpc = rpc
        self._chat = chat
        self._stream = stream
        self._model = model
        self.worker = worker
        self.url = url
        self._created = int(time.time())

    async def messages(self) -> AsyncIterator[Message]:
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        chunk: GenerationChunk | None = None
        try:
            async for response in self._rpc:
                chunk = to_chunk(response)
                if self._stream:
                    arrived = time.perf_counter()
                    for piece in self._chunks(chunk, texts):
                        yield Message(piece, arrived)
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.text)
                    finish[c.index] = c.finish_reason or finish.get(c.index)
        except grpc.RpcError as exc:
            raise _error(exc, self.url) from exc
        if not self._stream:
            yield Message(self._whole(chunk, texts, finish), time.perf_counter())

    def _envelope(self, request_id: str, kind: str) -> dict[str, Any]:
        return {"id": request_id, "object": kind, "created": self._created, "model": self._model}

    def _chunks(self, chunk: GenerationChunk, seen: Mapping[int, list[str]]) -> list[dict[str, Any]]:
        """The HTTP API's chunks for one gRPC message: one a choice (as OpenAI sends them), the
        message's usage on the last."""
        choices = []
        for c in chunk.choices:
            if self._chat:
                delta = {"content": c.text} if c.index in seen else {"role": "assistant", "content": c.text}
                choices.append(
                    {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}
                )
            else:
                choices.append(
                    {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                )
        kind = "chat.completion.chunk" if self._chat else "text_completion"
        envelope = self._envelope(chunk.request_id, kind)
        pieces = [{**envelope, "choices": [choice], "usage": None} for choice in choices]
        if not pieces:
            pieces = [{**envelope, "choices": [], "usage": None}]
        pieces[-1]["usage"] = _usage(chunk)
        return pieces

    def _whole(
        self, last: GenerationChunk | None, texts: Mapping[int, list[str]], finish: Mapping[int, str | None]
    ) -> dict[str, Any]:
        choices = []
        for index in sorted(texts):
            text = "".join(texts[index])
            if self._chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": index, "message": message, "logprobs": None, "finish_reason": finish[index]}
                )
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish[index]}
                )
        kind = "chat.completion" if self._chat else "text_completion"
        request_id = last.request_id if last else ""
        return {
            **self._envelope(request_id, kind),
            "choices": choices,
            "usage": _usage(last) if last else None,
        }


def _prompt(body: Mapping[str, Any], chat: bool) -> Any:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError.invalid_request("messages must be a non-empty list of messages", "messages")
        return messages
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise APIError.invalid_request(
        "prompt is invalid over gRPC: allowed one text or one list of token ids", "prompt"
    )


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    other = sorted(k for k in body if k not in _HANDLED and k not in _SAME)
    if other:
        raise APIError.invalid_request(
            f"{other[0]} is not available over gRPC: send it with transport='http'", other[0]
        )
    options = {k: body[k] for k in _SAME if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    return options


def _usage(chunk: GenerationChunk) -> dict[str, Any] | None:
    u = chunk.usage
    if u is None:
        return None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _error(exc: grpc.RpcError, url: str) -> Exception:
    trailing = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
    if exc.code() == grpc.StatusCode.UNAVAILABLE and ERROR_TYPE_METADATA not in trailing:  # type: ignore[attr-defined]
        # Not a worker's own 503 (draining): nobody answered at that address.
        return ConnectError(f"cannot connect to {url}: {exc.details()}")  # type: ignore[attr-defined]
    return to_api_error(exc)
