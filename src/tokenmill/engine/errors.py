"""Typed errors of the engine.

Every error a user can cause says which field was wrong, the value it had and
what is allowed, so a server can turn it into an OpenAI-style 400 without
parsing messages. The engine imports nothing of tokenmill, so these live here
rather than in ``tokenmill.protocol``.
"""

from __future__ import annotations

from typing import Any


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request parameter is out of range. Nothing was allocated for it."""

    def __init__(self, field: str, value: Any, allowed: str, message: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(message or f"{field}={shown} is invalid: allowed {allowed}")


class PromptTooLongError(InvalidRequestError):
    """The prompt leaves no room for a single output token within max_model_len."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int, at_least: bool = False):
        """``at_least``: ``num_prompt_tokens`` is a lower bound, known without tokenizing."""
        has = f"at least {num_prompt_tokens}" if at_least else f"{num_prompt_tokens}"
        super().__init__(
            "prompt",
            f"<{has} tokens>",
            f"at most {max_model_len - 1} tokens (max_model_len={max_model_len})",
            message=(
                f"prompt has {has} tokens, but max_model_len is {max_model_len}: "
                f"at most {max_model_len - 1} prompt tokens leave room for one output token"
            ),
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class MaxTokensTooLargeError(InvalidRequestError):
    """A max_tokens that the context cannot hold after the prompt, from a caller that asked for a
    refusal rather than the cut to fit (``truncate_max_tokens=False``: an API server, as vLLM's
    OpenAI server refuses it)."""

    def __init__(self, max_tokens: int, num_prompt_tokens: int, max_model_len: int):
        self.max_tokens = max_tokens
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len
        super().__init__(
            "max_tokens",
            max_tokens,
            f"at most {max_model_len - num_prompt_tokens} (max_model_len={max_model_len} less the "
            f"prompt's {num_prompt_tokens} tokens)",
            message=self.message_for("max_tokens"),
        )

    def message_for(self, field: str) -> str:
        """The message naming ``field`` as the API calls it. vLLM's wording, numbers and all:
        agents and SDKs read the limit out of it to retry with a max_tokens that fits."""
        n, p, mt = self.max_model_len, self.num_prompt_tokens, self.max_tokens
        return (
            f"'{field}' is too large: {mt}. This model's maximum context length is {n} tokens and "
            f"your request has {p} input tokens ({mt} > {n} - {p})"
        )


class ModelLoadError(EngineError):
    """The model folder is missing, incomplete or corrupt."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture the engine has no implementation for."""


class InsufficientKVCacheError(EngineError):
    """The KV cache pool cannot hold even one sequence of max_model_len tokens."""


class RequestNotFoundError(EngineError, KeyError):
    """abort() or a lookup named a request id the engine does not hold."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full (``max_waiting_requests``): retry after ``retry_after`` seconds.

    Nothing was queued. A server maps it to 429 with a Retry-After header.
    """

    def __init__(self, num_waiting: int, max_waiting: int, retry_after: float):
        self.num_waiting = num_waiting
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        super().__init__(
            f"engine overloaded: {num_waiting} requests already wait (max_waiting_requests={max_waiting}); "
            f"retry in about {retry_after:.1f} s"
        )


class EngineDeadError(EngineError):
    """The engine's step loop stopped on an internal error; the engine must be restarted."""
