"""OpenAI API models shared by completions and chat: sampling fields, usage, models, tokenize.

Field names and meanings follow OpenAI's API; tokenmill's extras (``priority``,
``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``, ``repetition_penalty``,
``cache_salt``, ...) are spelled as vLLM spells them, so clients written for
vLLM work unchanged. Ranges are declared here, so the OpenAPI schema states them
and a bad value is refused before it reaches the engine.
"""

from __future__ import annotations

import logging
import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.protocol.headers import PRIORITY_MAX, PRIORITY_MIN

logger = logging.getLogger(__name__)


_LOGGED_UNKNOWN: set[str] = set()  # unknown request fields already logged
_LOG_UNKNOWN_MAX = 64  # distinct names logged at most (a client sending random ones cannot flood the log)


def _admits_none(annotation: Any) -> bool:
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _admits_none(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(_admits_none(a) for a in get_args(annotation))
    if origin is Literal:
        return None in get_args(annotation)
    return False


@cache
def _null_means_default(model: type[BaseModel]) -> frozenset[str]:
    """The keys of ``model``'s fields that have a default and no meaning of their own for null."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        if not info.is_required() and not _admits_none(info.annotation):
            keys.update(k for k in (name, info.alias) if k)
    return frozenset(keys)


def _nullable_in_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema says what the validator accepts: null on the fields where it means the default."""
    properties = schema.get("properties", {})
    for key in _null_means_default(model) & properties.keys():
        prop = properties[key]
        outer = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        branches = prop.pop("anyOf") if set(prop) == {"anyOf"} else [prop]
        properties[key] = {"anyOf": [*branches, {"type": "null"}], **outer}


class StrictModel(BaseModel):
    """Base of every request model.

    Unknown fields are ignored (OpenAI adds fields often; clients send them); NaN and inf are
    refused. An explicit null means the field's default, as in OpenAI's API and vLLM's: SDKs,
    proxies and serialisers send ``None`` for what a caller left unset (the official client's
    ``n=None``). A field whose null means something else (``max_tokens``: no limit) keeps it.
    """

    model_config = ConfigDict(
        extra="ignore", allow_inf_nan=False, populate_by_name=True, json_schema_extra=_nullable_in_schema
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            keys = _null_means_default(cls)
            if any(data.get(k, 0) is None for k in keys):
                data = {k: v for k, v in data.items() if v is not None or k not in keys}
        return data


class StreamOptions(StrictModel):
    # A misspelt option would silently give no usage: refused (it names the key), unlike top-level fields.
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with usage and no choices
    continuous_usage_stats: bool = False  # usage so far on every chunk


def unsupported(what: str) -> Any:
    """A field tokenmill knows and refuses unless it is null or empty."""
    return Field(None, description=f"Not supported ({what}): omit it, or send null or empty.")


class ResponseFormat(StrictModel):
    type: Literal["text"] = Field(description="Only plain text is supported.")


class SamplingRequest(StrictModel):
    """The fields completions and chat share. A field it does not know is ignored, as vLLM does
    (clients send OpenAI's newer fields), and its name logged once, so a misspelt one is seen."""

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(_LOGGED_UNKNOWN) < _LOG_UNKNOWN_MAX:
            for name in data.keys() - cls.model_fields.keys() - _LOGGED_UNKNOWN:
                if isinstance(name, str) and len(_LOGGED_UNKNOWN) < _LOG_UNKNOWN_MAX:
                    _LOGGED_UNKNOWN.add(name)
                    logger.warning("ignoring the request field %r, which tokenmill does not know", name[:64])
        return data

    model: str | None = Field(None, description="The served model name; omitted means this worker's model.")
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128, description="Must equal n when given.")
    temperature: float | None = Field(None, ge=0, le=100, description="0 is greedy; default: the model's.")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="Up to 16 strings that end generation.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="An int64; the same seed and request give the same text."
    )
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be empty.")
    response_format: ResponseFormat | None = None
    # tokenmill (and vLLM) extras
    priority: int | None = Field(
        None,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="Higher is served first; x-tokenmill-priority also sets it.",
    )
    top_k: int | None = Field(None, ge=-1, description="Sample among the k most likely tokens; 0 or -1: all.")
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description="Isolates prefix cache.")
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    truncate_max_tokens: bool = Field(
        False,
        description="true: a max_tokens past what the context leaves after the prompt is cut to fit "
        "(the answer ends with finish_reason length) instead of refused with a 400.",
    )
    # vLLM fields tokenmill cannot honour: declared so that a request setting one gets a 400 naming
    # it (server/sampling.py), not text that looks right and ignored the constraint.
    guided_json: Any = unsupported("vLLM structured output")
    guided_regex: Any = unsupported("vLLM structured output")
    guided_choice: Any = unsupported("vLLM structured output")
    guided_grammar: Any = unsupported("vLLM structured output")
    guided_decoding_backend: Any = unsupported("vLLM structured output")
    guided_whitespace_pattern: Any = unsupported("vLLM structured output")
    structured_outputs: Any = unsupported("vLLM structured output")
    prompt_logprobs: Any = unsupported("prompt logprobs")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
