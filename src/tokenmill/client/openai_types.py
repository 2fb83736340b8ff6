"""OpenAI responses as typed objects: completions and chat, whole and streamed.

Each object keeps the JSON it came from in ``raw`` (servers add fields, and a
caller may want them) and the worker that served it in ``worker`` (the
``x-tokenmill-worker`` header; the endpoint's URL for servers that do not send
it), so request spread can be watched from the caller's side too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CompletionUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache

    @classmethod
    def parse(cls, usage: Any) -> CompletionUsage | None:
        if not isinstance(usage, dict):
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        total = _count(usage.get("total_tokens")) or prompt + completion
        return cls(prompt, completion, total, _count(cached))


def _count(value: Any) -> int:
    """A token count as a server sent it; anything but a whole number >= 0 (a string, NaN) counts 0,
    so a server's odd usage cannot fail the answer it came with."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | None


@dataclass(frozen=True, slots=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChatDelta:
    role: str | None
    content: str | None


@dataclass(frozen=True, slots=True)
class ChatChunkChoice:
    index: int
    delta: ChatDelta
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CompletionChoice:
    """One sample of a completion; in a streamed chunk, the text since the previous chunk."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChatCompletion:
    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: CompletionUsage | None
    worker: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, body: dict[str, Any], worker: str | None) -> ChatCompletion:
        choices = []
        for c in body.get("choices") or []:
            message = c.get("message") or {}
            choices.append(
                ChatChoice(
                    _count(c.get("index", 0)),
                    ChatMessage(str(message.get("role", "assistant")), message.get("content")),
                    c.get("finish_reason"),
                    c.get("logprobs"),
                )
            )
        return cls(*_envelope(body), choices, CompletionUsage.parse(body.get("usage")), worker, body)


@dataclass(frozen=True, slots=True)
class ChatCompletionChunk:
    id: str
    model: str
    created: int
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None  # on the last chunk, when the stream was asked to include usage
    worker: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, body: dict[str, Any], worker: str | None) -> ChatCompletionChunk:
        choices = []
        for c in body.get("choices") or []:
            delta = c.get("delta") or {}
            choices.append(
                ChatChunkChoice(
                    _count(c.get("index", 0)),
                    ChatDelta(delta.get("role"), delta.get("content")),
                    c.get("finish_reason"),
                    c.get("logprobs"),
                )
            )
        return cls(*_envelope(body), choices, CompletionUsage.parse(body.get("usage")), worker, body)

    @property
    def text(self) -> str:
        """The first choice's new text ("" when it has none)."""
        for c in self.choices:
            if c.index == 0:
                return c.delta.content or ""
        return ""


@dataclass(frozen=True, slots=True)
class Completion:
    """A completion, or, streamed, one chunk of it (same shape, as in OpenAI's API)."""

    id: str
    model: str
    created: int
    choices: list[CompletionChoice]
    usage: CompletionUsage | None
    worker: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, body: dict[str, Any], worker: str | None) -> Completion:
        choices = [
            CompletionChoice(
                _count(c.get("index", 0)), str(c.get("text") or ""), c.get("finish_reason"), c.get("logprobs")
            )
            for c in body.get("choices") or []
        ]
        return cls(*_envelope(body), choices, CompletionUsage.parse(body.get("usage")), worker, body)

    @property
    def text(self) -> str:
        """The first choice's text ("" when it has none)."""
        for c in self.choices:
            if c.index == 0:
                return c.text
        return ""


CompletionChunk = Completion


def _envelope(body: dict[str, Any]) -> tuple[str, str, int]:
    created = body.get("created")
    if isinstance(created, float) and created == created and abs(created) < 2**53:  # (not NaN, inf)
        created = int(created)  # a server that writes its Unix time as a float
    return str(body.get("id", "")), str(body.get("model", "")), _count(created)
