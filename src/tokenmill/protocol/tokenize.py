"""``POST /tokenize`` (vLLM's): the token ids of a prompt, or of messages rendered as chat renders them."""

from __future__ import annotations

from pydantic import BaseModel, Field

from tokenmill.protocol.chat import ChatMessage, ChatRendering


class TokenizeRequest(ChatRendering):
    """Exactly one of ``prompt`` or ``messages``; the chat fields mean what they mean on chat, so
    the tokens are those a chat request with the same messages is served with."""

    model: str | None = None
    prompt: str | None = Field(None, description="Text; or send messages.")
    add_special_tokens: bool = Field(True, description="With prompt: add the model's BOS token.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Or send prompt.")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
