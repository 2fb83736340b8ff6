"""OpenAI ``/v1/chat/completions``: request, response and stream chunk models."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from tokenmill.protocol.openai_common import SamplingRequest, StrictModel, Usage, unsupported


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)  # (the gRPC front checks against the same)


class ChatMessage(StrictModel):
    role: ChatRole
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    # An assistant's calls: the template would drop them, so a history that has some is refused.
    tool_calls: Any = unsupported("tool calls")
    function_call: Any = unsupported("function calling")

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        # Only an assistant's message may come without content (OpenAI: one that called tools).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRendering(StrictModel):
    """How messages become the prompt: the fields chat and /tokenize share, so both render alike."""

    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        False,
        description="Leave the final assistant message open for the model to continue; "
        "needs add_generation_prompt false.",
    )
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = unsupported("a chat template per request: the model's own is used")


class ChatCompletionRequest(SamplingRequest, ChatRendering):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI: max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="null: up to the context length.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(
        False,
        description="vLLM's: when the last message is the assistant's (continue_final_message), the "
        "reply starts with its content.",
    )
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be empty.")
    tool_choice: str | dict[str, Any] | None = None
    functions: Any = unsupported("OpenAI's legacy function calling")
    function_call: Any = unsupported("OpenAI's legacy function calling; 'none' and 'auto' are accepted")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobContent(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobContent] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One SSE chunk: the first of each choice carries the role with the first content token."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
