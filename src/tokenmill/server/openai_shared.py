"""What the completions and chat handlers share: model check, ids, usage, SSE framing."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.outputs import RequestOutput
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.openai_common import SamplingRequest
from tokenmill.server.logprobs import LogprobFormatter
from tokenmill.server.sampling import api_defaults
from tokenmill.server.worker import Worker

DONE = "data: [DONE]\n\n"


class OpenAIHandler:
    """Base of the endpoint handlers: the worker and what every request needs from it."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.tokenizer = worker.engine.engine.tokenizer
        self.defaults = api_defaults(worker.engine.engine.generation_config)
        self.logprobs = LogprobFormatter(self.tokenizer)

    def check_model(self, req: SamplingRequest) -> str:
        if req.model not in (None, "", self.worker.model_name):
            raise APIError.model_not_found(req.model, [self.worker.model_name])
        return self.worker.model_name


def echo_with_logprobs() -> APIError:
    """``echo`` with ``logprobs``, on either endpoint: OpenAI and vLLM give the echoed text's
    logprobs too; tokenmill computes no prompt logprobs, and the reply's alone would pass for the
    whole text's."""
    return APIError.invalid_request(
        "logprobs with echo=true is not supported: prompt logprobs are not supported; "
        "send echo without logprobs, or logprobs without echo",
        "logprobs",
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_chunk(
    rid: str, kind: str, created: int, model: str, choices: list[dict[str, Any]], usage: dict | None = None
) -> str:
    """One chunk of a streamed answer; ``usage`` where the client asked for it in this chunk."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        chunk["usage"] = usage
    return sse(chunk)


def sse_error(error: APIError) -> str:
    """An error that happens after the stream started: the status is already sent, so it goes inline."""
    return sse(error.to_body())


@dataclass
class UsageCounter:
    """Tokens of a request across its prompts and samples, as they stream."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    _seen: set[int] = field(default_factory=set)

    def add_prompt(self, index: int, out: RequestOutput) -> None:
        if index not in self._seen:  # once per prompt, on its first output
            self._seen.add(index)
            self.prompt_tokens += len(out.prompt_token_ids)
            self.cached_tokens += out.metrics.num_cached_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def final_usage(outputs: Sequence[RequestOutput]) -> dict[str, Any]:
    usage = UsageCounter()
    for i, out in enumerate(outputs):
        usage.add_prompt(i, out)
        usage.completion_tokens += sum(len(c.token_ids) for c in out.outputs)
    return usage.to_dict()
