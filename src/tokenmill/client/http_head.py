"""HTTP/1.1 request heads for ``HTTPTransport``: field names and values checked, lines encoded,
and response fields gathered into a dict."""

from __future__ import annotations

import re
from collections.abc import Mapping

TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 field names and methods
_SECRET = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})


def lowered(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {name.lower(): value for name, value in (headers or {}).items()}


# Header lines checked before: a router sends the same few fields with every request, and the
# checks cost more than the rest of the request's encoding. Bounded: emptied when full.
_LINES: dict[tuple[str, str], str] = {}
_LINES_MAX = 4096


def head_lines(headers: Mapping[str, str]) -> str:
    lines = []
    for field in headers.items():
        try:
            line = _LINES.get(field)
        except TypeError:  # an unhashable value: no string, as head_line will say
            line = head_line(*field)
        if line is None:
            line = head_line(*field)
            if len(_LINES) >= _LINES_MAX:
                _LINES.clear()
            _LINES[field] = line
        lines.append(line)
    return "".join(lines)


def head_line(name: str, value: str) -> str:
    if not TOKEN.match(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP field name")
    if not isinstance(value, str) or "\r" in value or "\n" in value or not _is_latin1(value):
        # A credential is not echoed: error messages end up in logs.
        shown = f"a {type(value).__name__} (not shown)" if name.lower() in _SECRET else f"{value!r:.200}"
        raise ValueError(f"header {name!r} must be a one-line latin-1 string, got {shown}")
    return f"{name}: {value}\r\n"


def _is_latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def header_dict(pairs: list[tuple[str, str]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in pairs:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
