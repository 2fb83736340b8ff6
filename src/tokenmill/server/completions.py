"""``POST /v1/completions``: one or more prompts, streamed as SSE or returned whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.engine.input_processor import Prompt
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request_stream import RequestStream
from tokenmill.protocol.completions import CompletionRequest
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import PRIORITY_HEADER
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
from tokenmill.server.prompt_tokens import tokenized
from tokenmill.server.sampling import request_priority, to_sampling_params
from tokenmill.server.streams import (
    SSEResponse,
    cancel_on_disconnect,
    close_all,
    final_outputs,
    merge,
    open_streams,
)

MAX_PROMPTS = 256
MAX_SEQUENCES_PER_REQUEST = 256  # prompts x n: one request must not fill a worker on its own


class CompletionsHandler(OpenAIHandler):
    async def __call__(self, req: CompletionRequest, request: Request) -> Response:
        model = self.check_model(req)
        if req.suffix is not None:
            raise APIError.invalid_request("suffix is not supported: omit it or send null", "suffix")
        if req.echo and req.logprobs is not None:
            raise echo_with_logprobs()
        prompts = _prompts(req.prompt)
        if len(prompts) * req.n > MAX_SEQUENCES_PER_REQUEST:
            raise APIError.invalid_request(
                f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} sequences: "
                f"allowed at most {MAX_SEQUENCES_PER_REQUEST} per request",
                "n",
            )
        params = to_sampling_params(req, self.defaults, req.max_tokens, req.logprobs, req.stream)
        priority = request_priority(req, request.headers.get(PRIORITY_HEADER))
        rid = new_id("cmpl")
        truncate = req.max_tokens is None or req.truncate_max_tokens  # (see chat)
        prompts = await tokenized(self.tokenizer, prompts)
        streams = open_streams(self.worker, prompts, params, rid, priority, req.cache_salt, truncate)
        if req.stream:
            return SSEResponse(self._stream(req, streams, rid, model))
        try:
            outputs = await cancel_on_disconnect(request, final_outputs(streams))
        finally:
            close_all(streams)
        return JSONResponse(self._response(req, outputs, rid, model))

    # -- whole response --------------------------------------------------------

    def _response(self, req: CompletionRequest, outputs: list[RequestOutput], rid: str, model: str) -> dict:
        choices = []
        for i, out in enumerate(outputs):
            prefix = self._echo(out) if req.echo else ""
            for c in out.outputs:
                choices.append(self._choice(req, i * req.n + c.index, c, prefix + c.text, len(prefix)))
        return {
            "id": rid,
            "object": "text_completion",
            "created": now(),
            "model": model,
            "choices": choices,
            "usage": final_usage(outputs),
        }

    def _choice(
        self, req: CompletionRequest, index: int, c: CompletionOutput, text: str, offset: int
    ) -> dict:
        logprobs = None
        if req.logprobs is not None and c.logprobs is not None:
            logprobs = self.logprobs.completion(c.logprobs, offset)
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    def _echo(self, out: RequestOutput) -> str:
        return out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)

    # -- SSE ----------------------------------------------------------------------

    async def _stream(
        self, req: CompletionRequest, streams: list[RequestStream], rid: str, model: str
    ) -> AsyncIterator[str]:
        created = now()
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        usage = UsageCounter()
        offsets: dict[int, int] = {}  # choice index -> characters sent, for logprob text offsets
        try:
            async for i, out in merge(streams):
                usage.add_prompt(i, out)
                # One chunk per choice, as OpenAI and vLLM send them: clients read choices[0].
                for c in out.outputs:
                    if not c.token_ids and not c.finished:
                        continue  # this sample had nothing new this step
                    index = i * req.n + c.index
                    text = c.text
                    if index not in offsets:
                        offsets[index] = 0
                        if req.echo:  # the prompt comes first, and the logprobs' offsets count it
                            echoed = self._echo(out)
                            text = echoed + text
                            offsets[index] = len(echoed)
                    usage.completion_tokens += len(c.token_ids)
                    choice = self._choice(req, index, c, text, offsets[index])
                    # Offsets count the tokens' own texts, as the whole answer's do: text held back
                    # while it might begin a stop string comes out later than its tokens.
                    offsets[index] = _end_offset(choice["logprobs"], offsets[index])
                    running = usage.to_dict() if continuous else None
                    yield sse_chunk(rid, "text_completion", created, model, [choice], running)
            if include_usage:
                yield sse_chunk(rid, "text_completion", created, model, [], usage.to_dict())
            yield DONE
        except Exception as e:  # the status line is gone already: report inline, then end the stream
            yield sse_error(to_api_error(e))
            yield DONE
        finally:
            close_all(streams)


def _end_offset(logprobs: dict[str, Any] | None, start: int) -> int:
    """Where the next chunk's tokens start in the choice's text (``start``: where this one's did)."""
    if not logprobs or not logprobs["tokens"]:
        return start
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _prompts(prompt: Any) -> list[Prompt]:
    """One prompt or a batch: text, token ids, a list of texts or a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError.invalid_request("prompt is empty: send text or token ids", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise APIError.invalid_request(
            f"prompt has {len(prompt)} entries: allowed at most {MAX_PROMPTS}", "prompt"
        )
    return [p if isinstance(p, str) else list(p) for p in prompt]
