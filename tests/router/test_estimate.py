"""The router's prompt estimate against the demo model's tokenizer (byte-level BPE): non-ASCII text
is counted high enough that a reservation covers what the worker will count."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenmill.engine.tokenizer as tokenizer_module
from tokenmill.router.call import estimate_tokens
from tokenmill.router.prefix_index import prompt_text


@pytest.fixture(scope="module")
def demo() -> tokenizer_module.Tokenizer:
    return tokenizer_module.Tokenizer(Path(tokenizer_module.__file__).parent / "demo_model")


def prompt_estimate(body: dict) -> int:
    return estimate_tokens(body, prompt_text(body))[0]


@pytest.mark.parametrize("text", ["€" * 300, "你好世界" * 50, "😀" * 50, "é" * 100, "€\u00a0" * 7])
def test_non_ascii_text_is_estimated_at_least_at_what_the_worker_counts(demo, text):
    """The QA repro: 300 "€" were estimated at 75 tokens, and the demo tokenizer makes 901: five
    such requests at once used 4.5x a team's minute and day."""
    assert prompt_estimate({"prompt": text}) >= len(demo.encode(text))
    batch = {"prompt": [text, text]}  # (their JSON has each "€" as a \u20ac escape)
    assert prompt_estimate(batch) >= 2 * len(demo.encode(text))


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), min_size=1, max_size=200))
def test_text_without_ascii_is_never_underestimated(demo, text):
    assert prompt_estimate({"prompt": text}) >= len(demo.encode(text))


def test_ascii_text_is_estimated_as_before():
    assert prompt_estimate({"prompt": "a" * 20}) == 5  # four characters a token
    assert prompt_estimate({"prompt": ["abcd", "efgh"]}) == 4  # their JSON, '["abcd","efgh"]': 15 characters
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert prompt_estimate(chat) == 2 + 6 * 2  # \x1euser\x1fHi, and the template's tokens
