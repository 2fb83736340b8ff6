"""``POST /tokenize`` (vLLM's): the token ids of a prompt, or of messages rendered as chat renders them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from tokenmill.protocol.chat import ChatMessage
from tokenmill.protocol.openai_common import StrictModel, unsupported


class TokenizeRequest(StrictModel):
    """Exactly one of ``prompt`` or ``messages``; the chat fields mean what they mean on chat, so
    the tokens are those a chat request with the same messages is served with."""

    model: str | None = None
    prompt: str | None = Field(None, description="Text; or send messages.")
    add_special_tokens: bool = Field(True, description="With prompt: add the model's BOS token.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Or send prompt.")
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(
        False,
        description="Leave the final assistant message open for the model to continue; "
        "needs add_generation_prompt false.",
    )
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = unsupported("a chat template per request: the model's own is used")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
