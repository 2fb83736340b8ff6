"""Pydantic's validation errors as one OpenAI 400 that names the field, its value and the rule."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

from tokenmill.protocol.errors import APIError


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or "(" in str(p) or "-" in str(p):
            continue  # pydantic's union branch labels ("list[int]", "function-after[...]"): noise
        else:
            out += f".{p}" if out else str(p)
    return out


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """``content_type``: the request's, to say so when a body was not sent as JSON at all."""
    errors = exc.errors()
    if not errors:
        return APIError.invalid_request("invalid request body")
    # Union fields report one error per branch; the first names the field all the same.
    first = errors[0]
    if first.get("type") in ("json_invalid", "model_attributes_type") or not first.get("loc")[1:]:
        if content_type and "json" not in content_type.lower():
            # (FastAPI reads a body as JSON only when it is labelled so: curl -d sends a form's type)
            return APIError.invalid_request(
                f"the request body must be a JSON object sent with content-type: application/json; "
                f"it came as {content_type!r}"
            )
        return APIError.invalid_request(f"the request body is not a valid JSON object: {first.get('msg')}")
    param = field_path(first["loc"]) or None
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    message = f"{param}={shown} is invalid: {first.get('msg')}"
    if first.get("type") == "missing":
        message = f"{param} is required"
    more = len({field_path(e["loc"]) for e in errors} - {param})
    if more:
        message += f" (and {more} more invalid field{'s' if more > 1 else ''})"
    return APIError.invalid_request(message, param)
