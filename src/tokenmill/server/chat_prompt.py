"""Chat messages to prompt token ids with the model's chat template, for chat and /tokenize alike."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.errors import EngineError, PromptTooLongError
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.protocol.chat import ChatMessage
from tokenmill.protocol.errors import APIError
from tokenmill.server.errors import to_api_error
from tokenmill.server.prompt_tokens import encode_chat
from tokenmill.server.sampling import is_given

# Arguments of the rendering call (transformers' apply_chat_template), not variables of the
# template. In chat_template_kwargs they would let any caller replace the server's template
# (chat_template), or change the call (tools would slip past the refusal of the tools field).
RENDER_ARGUMENTS = frozenset(
    {
        "chat_template",
        "tokenize",
        "conversation",
        "messages",
        "add_generation_prompt",
        "continue_final_message",
        "tools",
        "documents",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
TOP_LEVEL = ("messages", "add_generation_prompt", "continue_final_message")  # request fields


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise APIError 400 naming the first key of ``kwargs`` that is not a template variable."""
    bad = sorted(RENDER_ARGUMENTS & kwargs.keys())
    if bad:
        key = bad[0]
        hint = ""
        if key in TOP_LEVEL:
            hint = f"; send {key} as a request field"
        elif key == "chat_template":
            hint = "; the model's chat template cannot be replaced by a request"
        raise APIError.invalid_request(
            f"chat_template_kwargs.{key} is not allowed: chat_template_kwargs holds variables of the "
            f"chat template, and {key} is an argument of its rendering{hint}",
            f"chat_template_kwargs.{key}",
        )


async def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> list[int]:
    """The prompt's token ids; raises APIError 400 naming the field a caller got wrong."""
    for i, m in enumerate(messages):
        for name in ("tool_calls", "function_call"):
            if is_given(getattr(m, name)):
                # Chat templates that know no tools drop the calls: the model would see a history
                # in which the assistant said nothing.
                raise APIError.invalid_request(
                    f"messages[{i}].{name} is not supported by tokenmill (tool calls): omit it",
                    f"messages[{i}].{name}",
                )
    check_template_kwargs(chat_template_kwargs or {})
    try:
        return await encode_chat(  # (a long prompt is encoded off the event loop)
            tokenizer,
            [m.template_dict() for m in messages],
            add_generation_prompt,
            continue_final_message=continue_final_message,
            **(chat_template_kwargs or {}),
        )
    except PromptTooLongError as e:
        raise to_api_error(e, prompt_field="messages") from None
    except EngineError as e:
        raise to_api_error(e) from None
