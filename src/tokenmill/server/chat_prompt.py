"""Chat messages to prompt token ids with the model's chat template, for chat and /tokenize alike."""

from __future__ import annotations

from typing import Any

from tokenmill.engine.errors import EngineError, PromptTooLongError
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.protocol.chat import ChatMessage
from tokenmill.protocol.errors import APIError
from tokenmill.server.errors import to_api_error
from tokenmill.server.sampling import is_given


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
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
    try:
        return tokenizer.encode_chat(
            [m.template_dict() for m in messages],
            add_generation_prompt=add_generation_prompt,
            **(chat_template_kwargs or {}),
        )
    except PromptTooLongError as e:
        raise to_api_error(e, prompt_field="messages") from None
    except EngineError as e:
        raise to_api_error(e) from None
    except TypeError as e:  # chat_template_kwargs that clash with the template's own arguments
        raise APIError.invalid_request(
            f"chat_template_kwargs is invalid: {e}", "chat_template_kwargs"
        ) from None
