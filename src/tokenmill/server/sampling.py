"""OpenAI request fields to the engine's ``SamplingParams``.

Fields a request leaves out take the model's ``generation_config.json`` values,
then OpenAI's defaults (temperature 1, top_p 1), as vLLM does. Fields tokenmill
cannot honour are refused with a 400 naming them, never silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.protocol.errors import APIError
from tokenmill.protocol.headers import PRIORITY_HEADER, parse_priority
from tokenmill.protocol.openai_common import SamplingRequest

MAX_STOP_STRINGS = 16

# Fields tokenmill knows and cannot honour (vLLM's and OpenAI's legacy ones), with what they ask for.
# The request models declare them (a field they do not declare is ignored, as OpenAI's newer ones
# are): a caller relying on one learns at once, instead of getting unconstrained text.
UNSUPPORTED = {
    "guided_json": "vLLM's structured output",
    "guided_regex": "vLLM's structured output",
    "guided_choice": "vLLM's structured output",
    "guided_grammar": "vLLM's structured output",
    "guided_decoding_backend": "vLLM's structured output",
    "guided_whitespace_pattern": "vLLM's structured output",
    "structured_outputs": "vLLM's structured output",
    "prompt_logprobs": "prompt logprobs",
    "functions": "OpenAI's legacy function calling",
    "function_call": "OpenAI's legacy function calling",
    "chat_template": "a chat template per request; the model's own is used",
}
_HARMLESS = {"function_call": ("none", "auto")}  # as tool_choice: no function is called either way


def is_given(value: Any) -> bool:
    """A value that asks for something: not null and not empty ("", [], {})."""
    return value is not None and not (isinstance(value, str | list | dict) and not value)


def refuse_unsupported(req: BaseModel) -> None:
    """Raise APIError 400 naming the first field of ``UNSUPPORTED`` that ``req`` sets."""
    for name, what in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if is_given(value) and value not in _HARMLESS.get(name, ()):
            raise APIError.invalid_request(
                f"{name} is not supported by tokenmill ({what}): omit it or send null", name
            )


def api_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """Defaults for fields a request omits: the model's generation config over OpenAI's."""
    defaults: dict[str, Any] = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    for name in defaults:
        value = generation_config.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            defaults[name] = type(defaults[name])(value)
    return defaults


def to_sampling_params(
    req: SamplingRequest,
    defaults: dict[str, Any],
    max_tokens: int | None,
    logprobs: int | None,
    stream: bool,
) -> SamplingParams:
    """The engine's parameters for ``req``; raises APIError 400 for what cannot be served."""
    refuse_unsupported(req)
    if req.stream_options is not None and req.stream_options.model_fields_set and not stream:
        raise APIError.invalid_request("stream_options is only allowed with stream=true", "stream_options")
    if req.best_of is not None and req.best_of != req.n:  # (more samples to pick from: not supported)
        raise APIError.invalid_request(
            f"best_of={req.best_of} is invalid: allowed null or n ({req.n})", "best_of"
        )
    if req.logit_bias:
        raise APIError.invalid_request("logit_bias is not supported: omit it or send {}", "logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError.invalid_request(
            f"stop is invalid: allowed up to {MAX_STOP_STRINGS} non-empty strings", "stop"
        )

    def pick(name: str) -> Any:
        value = getattr(req, name)
        return defaults[name] if value is None else value

    return SamplingParams(
        n=req.n,
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        min_p=pick("min_p"),
        seed=req.seed,
        repetition_penalty=pick("repetition_penalty"),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        output_kind=OutputKind.DELTA if stream else OutputKind.FINAL_ONLY,
    )


def request_priority(req: SamplingRequest, header: str | None) -> int:
    """The body's ``priority`` if given, else the x-tokenmill-priority header, else 0."""
    if req.priority is not None:
        return req.priority
    return parse_priority(header, PRIORITY_HEADER) or 0
