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
        elif _is_union_branch(str(p)):
            continue  # which member of a union the error is about: noise to a user
        else:
            out += f".{p}" if out else str(p)
    return out


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list"})


def _is_union_branch(part: str) -> bool:
    """Pydantic's labels for a union's members: type names ("str", "list[int]",
    "function-after[...]") and model classes ("TokenizeChatRequest"); fields are snake_case."""
    return part in _TYPE_NAMES or "[" in part or "(" in part or "-" in part or part[:1].isupper()


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    """``content_type``: the request's, to say so when a body was not sent as JSON at all."""
    errors = exc.errors()
    if not errors:
        return APIError.invalid_request("invalid request body")
    # Union fields report one error per branch; the first names the field all the same.
    first = errors[0]
    # (A body that is not an object: no field named; a message in it that is not one names it.)
    if first.get("type") == "json_invalid" or not field_path(first.get("loc") or ()):
        if not content_type or "json" not in content_type.lower():
            # (FastAPI reads a body as JSON only when it is labelled so: curl -d sends a form's type,
            # and requests.post(url, data=...) sends none)
            came = f"it came as {content_type!r}" if content_type else "it came without a content-type"
            return APIError.invalid_request(
                f"the request body must be a JSON object sent with content-type: application/json; {came}"
            )
        return APIError.invalid_request(f"the request body is not a valid JSON object: {first.get('msg')}")
    param = field_path(first["loc"]) or None
    paths = list(dict.fromkeys(field_path(e["loc"]) for e in errors))
    if all(e.get("type") == "missing" for e in errors) and len(paths) > 1:
        # A body that is one of several shapes (a union of models), matching none.
        return APIError.invalid_request(f"one of {' or '.join(paths)} is required", param)
    shown = repr(first.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    # A union field reports one error per member: each says one form the value may take.
    inside = [p for p in paths if p == param or (param and p.startswith((f"{param}[", f"{param}.")))]
    forms = list(
        dict.fromkeys(
            (f"{path}: " if path != param else "") + str(e.get("msg"))
            for e in errors
            if (path := field_path(e["loc"])) in inside
        )
    )
    message = f"{param}={shown} is invalid: {'; or '.join(forms)}"
    if first.get("type") == "missing":
        message = f"{param} is required"
    more = len(set(paths) - set(inside))
    if more:
        message += f" (and {more} more invalid field{'s' if more > 1 else ''})"
    return APIError.invalid_request(message, param)
