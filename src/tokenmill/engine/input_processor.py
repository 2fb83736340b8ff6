"""From what a caller sends to the scheduler's ``Request`` objects: validation and tokenization.

``prepare`` has no side effect on the engine, so an ``AsyncEngine`` runs it in
the caller's thread (a bad request fails there, at once) and hands only
finished requests to the step loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tokenmill.engine.config import ModelConfig
from tokenmill.engine.errors import InvalidRequestError, MaxTokensTooLargeError, PromptTooLongError
from tokenmill.engine.request import Request
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.engine.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A text prompt with the token ids the engine's tokenizer gave it, encoded by the caller (a
    server does so for long texts on a thread, off its event loop); the text is kept for echo."""

    text: str
    token_ids: Sequence[int]


Prompt = str | Sequence[int] | TokenizedPrompt

_MASK64 = 2**64 - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: the user's id and one scheduler ``Request`` per sample."""

    request_id: str
    prompt: str | None
    params: SamplingParams
    children: list[Request]


class InputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
        max_model_len: int,
        eos_token_ids: frozenset[int],
    ):
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._sample_ids = itertools.count()

    def prepare(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        truncate_max_tokens: bool = True,
    ) -> PreparedRequest:
        """Raise InvalidRequestError on bad input; otherwise the requests to schedule.

        ``truncate_max_tokens``: a ``max_tokens`` past what the context leaves after the prompt is
        cut to fit (the answer then ends with finish reason ``length``), as vLLM's ``LLM`` does;
        False: refused with MaxTokensTooLargeError, as vLLM's OpenAI server does."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", request_id, "a non-empty string")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", type(params).__name__, "a SamplingParams")
        params.validate(vocab_size=self.model_config.vocab_size)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority", priority, "an integer (higher is more important)")
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError("cache_salt", cache_salt, "a non-empty string or None")
        text, token_ids = self._tokenize(prompt)
        room = self.max_model_len - len(token_ids)
        if not truncate_max_tokens and params.max_tokens is not None and params.max_tokens > room:
            raise MaxTokensTooLargeError(params.max_tokens, len(token_ids), self.max_model_len)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1:
                seed = None if params.seed is None else sample_seed(params.seed, i)
                child_params = replace(params, n=1, seed=seed)
            child = Request(
                # Internal ids end in a number unique to this engine, so no user id,
                # however spelled, can collide with another request's sample.
                request_id=f"{request_id}#{next(self._sample_ids)}",
                prompt_token_ids=token_ids,
                sampling_params=child_params,
                eos_token_ids=self.eos_token_ids,
                max_tokens=min(params.max_tokens or self.max_model_len, room),
                priority=priority,
                cache_salt=cache_salt,
            )
            if arrival_time is not None:
                child.times.arrival = arrival_time
            children.append(child)
        return PreparedRequest(request_id, text, params, children)

    def _tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        vocab = self.model_config.vocab_size
        if isinstance(prompt, TokenizedPrompt):
            _, token_ids = self._tokenize(prompt.token_ids)  # (checked as any ids are)
            return prompt.text, token_ids
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", prompt, "a non-empty string or list of token ids")
            token_ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, Sequence) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt_token_ids", bad[0], f"token ids in [0, {vocab})")
        elif isinstance(prompt, list | tuple) and prompt:
            bad = next(t for t in prompt if not isinstance(t, int) or isinstance(t, bool))
            raise InvalidRequestError("prompt_token_ids", bad, f"integer token ids in [0, {vocab})")
        else:
            raise InvalidRequestError("prompt", type(prompt).__name__, "a string or a list of token ids")
        if not token_ids:
            raise InvalidRequestError("prompt", prompt, "at least one token")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(len(token_ids), self.max_model_len)
        return text, token_ids


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded with ``seed`` (an int64; so is the result).

    Sample 0 keeps ``seed``, so an n=1 request draws what it always did. The others take the
    index-th output of a splitmix64 generator started from a hash of ``seed``: with ``seed + i``,
    seed 5 with n=3 and seed 6 with n=2 shared two samples, so an eval drawing n samples at seeds
    1..k got mostly duplicates. Pure integer arithmetic: the same on every run and platform.
    """
    if index == 0:
        return seed
    mixed = _splitmix64((_splitmix64(seed & _MASK64) + index * _GOLDEN_GAMMA) & _MASK64)
    return mixed - 2**64 if mixed >= 2**63 else mixed


def _splitmix64(z: int) -> int:
    # splitmix64's output function (Steele, Lea, Flood 2014): a bijection on 64 bits whose every
    # output bit depends on every input bit, so nearby inputs give unrelated outputs.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
