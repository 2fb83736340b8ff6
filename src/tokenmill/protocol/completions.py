"""OpenAI ``/v1/completions``: request, response and stream chunk models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tokenmill.protocol.openai_common import SamplingRequest, Usage

PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: PromptInput = Field(description="Text, token ids, or a batch of either.")
    max_tokens: int | None = Field(16, ge=1, description="null: up to the context length.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Top alternatives per token, beside it.")
    echo: bool = False
    suffix: str | None = Field(None, description="Not supported: must be null.")


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamResponse(BaseModel):
    """One SSE chunk; ``usage`` only on the last one (include_usage) or every one (continuous)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
