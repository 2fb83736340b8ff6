"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.engine.errors import MaxTokensTooLargeError, PromptTooLongError
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request_stream import RequestStream
from tokenmill.protocol.chat import ChatCompletionRequest
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import PRIORITY_HEADER
from tokenmill.server.chat_prompt import chat_prompt
from tokenmill.server.errors import to_api_error
from tokenmill.server.openai_shared import (
    DONE,
    OpenAIHandler,
    UsageCounter,
    echo_with_logprobs,
    final_usage,
    new_id,
    now,
    sse_chunk,
    sse_error,
)
from tokenmill.server.sampling import request_priority, to_sampling_params
from tokenmill.server.streams import SSEResponse, cancel_on_disconnect, close_all, final_outputs, open_streams


class ChatHandler(OpenAIHandler):
    async def __call__(self, req: ChatCompletionRequest, request: Request) -> Response:
        model = self.check_model(req)
        if req.tools:
            raise APIError.invalid_request("tools are not supported by this worker: omit them", "tools")
        if req.tool_choice not in (None, "none", "auto"):
            raise APIError.invalid_request(
                "tool_choice is not supported: omit it or send 'none'", "tool_choice"
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError.invalid_request("top_logprobs needs logprobs=true", "top_logprobs")
        if req.echo and req.logprobs:
            raise echo_with_logprobs()
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = to_sampling_params(req, self.defaults, max_tokens, logprobs, req.stream)
        priority = request_priority(req, request.headers.get(PRIORITY_HEADER))
        rid = new_id("chatcmpl")
        prompt = await chat_prompt(
            self.tokenizer,
            req.messages,
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
        )
        # A max_tokens the client named is refused past the context, as vLLM's server does; the
        # server's default (none named) is cut to fit.
        truncate = max_tokens is None or req.truncate_max_tokens
        try:
            streams = open_streams(self.worker, [prompt], params, rid, priority, req.cache_salt, truncate)
        except (PromptTooLongError, MaxTokensTooLargeError) as e:
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise to_api_error(e, prompt_field="messages", max_tokens_field=field) from None
        echoed = _echoed(req)
        if req.stream:
            return SSEResponse(self._stream(req, streams, rid, model, echoed))
        try:
            outputs = await cancel_on_disconnect(request, final_outputs(streams))
        finally:
            close_all(streams)
        return JSONResponse(self._response(req, outputs[0], rid, model, echoed))

    def _logprobs(self, req: ChatCompletionRequest, c: CompletionOutput) -> dict | None:
        if not req.logprobs or c.logprobs is None:
            return None
        return self.logprobs.chat(c.logprobs, req.top_logprobs or 0)

    def _response(
        self, req: ChatCompletionRequest, out: RequestOutput, rid: str, model: str, echoed: str
    ) -> dict:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": echoed + c.text},
                "logprobs": self._logprobs(req, c),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": final_usage([out]),
        }

    async def _stream(
        self, req: ChatCompletionRequest, streams: list[RequestStream], rid: str, model: str, echoed: str
    ) -> AsyncIterator[str]:
        created = now()
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        usage = UsageCounter()
        started: set[int] = set()  # choices whose first chunk (with the role) went out
        (stream,) = streams
        try:
            async for out in stream:
                usage.add_prompt(0, out)
                # One chunk per choice, as OpenAI and vLLM send them: clients read choices[0].
                for c in out.outputs:
                    if not c.token_ids and not c.finished:
                        continue
                    delta: dict[str, Any] = {"content": c.text}
                    if c.index not in started:
                        # The role travels with the first token, so every client times TTFT alike.
                        started.add(c.index)
                        delta = {"role": "assistant", "content": echoed + c.text}
                    usage.completion_tokens += len(c.token_ids)
                    choice = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": self._logprobs(req, c),
                        "finish_reason": c.finish_reason,
                    }
                    running = usage.to_dict() if continuous else None
                    yield sse_chunk(rid, "chat.completion.chunk", created, model, [choice], running)
            if include_usage:
                yield sse_chunk(rid, "chat.completion.chunk", created, model, [], usage.to_dict())
            yield DONE
        except Exception as e:
            yield sse_error(to_api_error(e))
            yield DONE
        finally:
            close_all(streams)


def _echoed(req: ChatCompletionRequest) -> str:
    """What ``echo`` puts before the reply: the last message's content when it is the assistant's
    (the reply's role), as vLLM does; nothing otherwise."""
    last = req.messages[-1]
    if not req.echo or last.role != "assistant":
        return ""
    return str(last.template_dict()["content"])
