"""Long prompts tokenized on a thread, off the server's event loop.

Tokenizing is about 1 ms per thousand characters here (2.5 s a megabyte). On the
event loop, one long prompt would hold every stream's next token back for that
long, and health checks with them; tokenizers' single-text call also holds the
GIL, which would stop the engine's step thread too. So a text from
``OFF_LOOP_CHARS`` characters on is encoded on a thread, by the tokenizer's call
that lets go of the GIL (``Tokenizer.encode``), and handed to the engine
already tokenized (``TokenizedPrompt``); a shorter one is encoded at once, where
a thread's hand-off would cost more than it saves. vLLM's server tokenizes off
its loop too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from tokenmill.engine.input_processor import Prompt, TokenizedPrompt
from tokenmill.engine.tokenizer import ChatMessage, Tokenizer

OFF_LOOP_CHARS = 8192  # about 8 ms of tokenizing here; a thread's hand-off costs about 0.1 ms


async def encode(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool = True, field: str = "prompt"
) -> list[int]:
    """``tokenizer.encode``, on a thread for a long text (it raises the same errors)."""
    if len(text) < OFF_LOOP_CHARS:
        return tokenizer.encode(text, add_special_tokens, field)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens, field)


async def encode_chat(
    tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True, **kwargs: Any
) -> list[int]:
    """``tokenizer.encode_chat``, with a long prompt encoded on a thread: the template renders here
    (string joins, quick), and its text is encoded as ``encode`` does."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt, **kwargs)
    # The template already writes the BOS text; adding specials again would double it.
    return await encode(tokenizer, text, add_special_tokens=False, field="messages")


async def tokenized(tokenizer: Tokenizer, prompts: Sequence[Prompt]) -> list[Prompt]:
    """``prompts`` with each long text tokenized (``TokenizedPrompt``); the others as they are,
    for the engine to encode when it takes them."""
    return [
        TokenizedPrompt(p, await encode(tokenizer, p))
        if isinstance(p, str) and len(p) >= OFF_LOOP_CHARS
        else p
        for p in prompts
    ]
