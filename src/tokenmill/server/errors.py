"""Engine errors become API errors: the field a user got wrong is named, nothing else leaks."""

from __future__ import annotations

import logging

from tokenmill.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    MaxTokensTooLargeError,
    PromptTooLongError,
)
from tokenmill.protocol.errors import APIError

logger = logging.getLogger(__name__)


def to_api_error(
    exc: BaseException, prompt_field: str = "prompt", max_tokens_field: str = "max_tokens"
) -> APIError:
    """The API error for an exception raised while serving a request.

    ``prompt_field`` names the prompt in this API (``messages`` for chat), for
    prompts over the context length and bad token ids; ``max_tokens_field`` the
    output limit the request named (chat's ``max_completion_tokens``).
    """
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, MaxTokensTooLargeError):
        return APIError.invalid_request(
            exc.message_for(max_tokens_field), param=max_tokens_field, code="context_length_exceeded"
        )
    if isinstance(exc, PromptTooLongError):
        return APIError.invalid_request(str(exc), param=prompt_field, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError) and exc.field == "prompt_token_ids":
        # The engine's name for a prompt given as token ids: the API calls it prompt.
        return APIError.invalid_request(
            f"{prompt_field} holds the token id {exc.value!r}: allowed {exc.allowed}", param=prompt_field
        )
    if isinstance(exc, InvalidRequestError):
        return APIError.invalid_request(str(exc), param=exc.field)
    if isinstance(exc, EngineOverloadedError):
        return APIError.overloaded(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, EngineDeadError):
        return APIError.unavailable(f"this worker cannot serve: {exc}")
    logger.error("internal error while serving a request", exc_info=exc)
    return APIError.internal(f"internal error: {type(exc).__name__}")
