"""A value a client sent, as an error message quotes it back."""

from __future__ import annotations

import json
from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """``value`` spelt as the client wrote it, in JSON (``true``, ``null``, ``"text"``; also valid
    YAML, for the gateway's config), not Python's (``True``, ``None``, ``'text'``); past ``limit``
    characters, cut with "…" so that a cut value is never quoted back as if whole."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
