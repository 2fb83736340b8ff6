"""Text as JSON delivers it: an escape such as ``"\\ud800"`` decodes to a lone surrogate, a
``str`` that UTF-8 (a tokenizer, SQLite, a header) cannot hold, so it is refused where it enters."""

from __future__ import annotations


def utf8_encodable(text: str) -> bool:
    """False when ``text`` holds an unpaired surrogate (U+D800-U+DFFF)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
