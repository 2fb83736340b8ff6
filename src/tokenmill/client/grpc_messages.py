"""What a Generate call sends and receives, as typed dataclasses, and their wire messages.

The gRPC messages stay inside ``tokenmill.client``: callers see only these
dataclasses, so a change to the proto does not reach their code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from tokenmill.protocol import generation_pb2 as pb
from tokenmill.protocol.errors import APIError

# Text, token ids, or chat messages ({"role", "content"}) that the worker renders with its template.
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


class GenerateOptions(TypedDict, total=False):
    """Sampling fields of a Generate call; any left out take the model's default."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    n: int
    min_tokens: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: str | list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    logprobs: int  # how many top alternatives to return per token (0: only the sampled one's)
    model: str  # checked against the worker's model when given
    cache_salt: str  # keeps this tenant's prompts out of others' prefix-cache hits


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1: the model's most likely token
    top: dict[int, float]  # token id -> logprob of the most likely tokens at this position


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """What sample ``index`` produced since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # None unless the request asked for logprobs
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: str | int | None = None  # the stop string or token id behind a "stop"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # over all samples
    cached_tokens: int  # prompt tokens found in the prefix cache


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    request_id: str  # what abort() takes
    choices: list[ChoiceDelta]
    usage: Usage | None = None  # on the last chunk only

    @property
    def text(self) -> str:
        """The first sample's new text in this chunk ("" if it has none)."""
        for c in self.choices:
            if c.index == 0:
                return c.text
        return ""


@dataclass(frozen=True, slots=True)
class Health:
    serving: bool  # False while the worker drains or after its engine stopped
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use, 0 to 1
    worker_id: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    architecture: str
    block_size: int
    max_num_seqs: int
    worker_id: str


_REQUEST_FIELDS = frozenset(GenerateOptions.__annotations__)


def build_request(
    prompt: Prompt, request_id: str | None, priority: int | None, options: GenerateOptions
) -> pb.GenerateRequest:
    """The GenerateRequest for a call; a value the wire cannot carry is a 400 naming its field."""
    unknown = set(options) - _REQUEST_FIELDS
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
    fields: dict[str, Any] = dict(options)
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if priority is not None:
        fields["priority"] = priority
    if isinstance(prompt, str):
        fields["text"] = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        fields["chat"] = {"messages": [_chat_message(i, m) for i, m in enumerate(prompt)]}  # type: ignore[arg-type]
    else:
        fields["token_ids"] = {"ids": prompt}
    try:
        return pb.GenerateRequest(request_id=request_id or "", **fields)
    except (TypeError, ValueError) as exc:  # e.g. an integer beyond int32: find which field
        for name, value in fields.items():
            try:
                pb.GenerateRequest(**{name: value})
            except (TypeError, ValueError):
                field = "prompt" if name in ("text", "token_ids", "chat") else name  # as the server names it
                shown = repr(prompt if field == "prompt" else value)
                shown = shown if len(shown) <= 80 else shown[:77] + "..."
                raise APIError.invalid_request(f"{field}={shown} is invalid: {exc}", field) from exc
        raise APIError.invalid_request(f"invalid request: {exc}") from exc


def _chat_message(i: int, message: Mapping[str, Any]) -> dict[str, str]:
    """One message as the wire carries it (content as one string), refused as HTTP chat refuses it:
    text parts are joined, other parts (images, audio) cannot be served, and only an assistant's
    message may come without content. Checked here, so nothing reaches the worker as a repr."""
    if "role" not in message:
        raise APIError.invalid_request(f"messages[{i}].role is required", f"messages[{i}].role")
    role = str(message["role"])
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    param = f"messages[{i}].content"
    if content is None:
        if role == "assistant":  # OpenAI: an assistant message that called tools has none
            return {"role": role, "content": ""}
        raise APIError.invalid_request(
            f"{param} is required for a {role} message: allowed a string or a list of text parts", param
        )
    if not isinstance(content, list | tuple):
        raise APIError.invalid_request(
            f"{param} is invalid: allowed a string or a list of text parts, got {type(content).__name__}",
            param,
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text":  # images, audio: the worker serves text models only
            raise APIError.invalid_request(
                f"{param}[{j}] is invalid: allowed text parts ({{'type': 'text', 'text': '...'}}) only,"
                f" got {kind!r}",
                param,
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise APIError.invalid_request(
                f"{param}[{j}].text is invalid: allowed a string, got {type(text).__name__}", param
            )
        texts.append(text)
    return {"role": role, "content": "".join(texts)}


def to_chunk(message: pb.GenerateResponse) -> GenerationChunk:
    choices = [_choice(c) for c in message.choices]
    usage = None
    if message.HasField("usage"):
        u = message.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return GenerationChunk(message.request_id, choices, usage)


def _choice(c: pb.ChoiceDelta) -> ChoiceDelta:
    logprobs = [
        TokenLogprob(lp.token_id, lp.logprob, lp.rank, {t.token_id: t.logprob for t in lp.top})
        for lp in c.logprobs
    ]
    which = c.WhichOneof("stop_reason")
    stop_reason = getattr(c, which) if which is not None else None
    return ChoiceDelta(
        c.index, c.text, list(c.token_ids), logprobs or None, c.finish_reason or None, stop_reason
    )


def to_health(r: pb.HealthResponse) -> Health:
    serving = r.status == pb.HealthResponse.SERVING
    return Health(serving, r.num_running, r.num_waiting, r.kv_cache_usage, r.worker_id)


def to_model_info(r: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        r.model, r.max_model_len, r.vocab_size, r.architecture, r.block_size, r.max_num_seqs, r.worker_id
    )
