"""What an OpenAI-compatible response says, written into its request's record.

Streams: every SSE event becomes a message (its arrival time and its tokens:
the usage delta with continuous usage, else one; 0 for an event without
content, such as the role-only chunk, the usage chunk and ``[DONE]``); the
usage gives the counts: a token may stream without text (vLLM sends a chunk
with empty content for a token that ends inside a UTF-8 character, or none at
all), so the content messages are only a floor on the output tokens. Whole
responses: one message at the end carrying every token. Failures are recorded
by kind (``records.ERROR_KINDS``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tokenmill.bench.records import RequestRecord


async def read_stream(
    response: Any, record: RequestRecord, started: float, chat: bool, continuous: bool
) -> str:
    """An SSE response: one message per event, stamped at its arrival (0 tokens for events
    without content); the reply's text. A stream must end with ``data: [DONE]``: one that
    stops before it was cut short, even if the connection closed cleanly."""
    pieces: list[str] = []
    seen_tokens = 0  # completion tokens of the last usage seen (continuous usage)
    running = False  # a chunk with choices carried usage: the server gives continuous usage
    finished = False
    async for event in response.events():
        at, data = event.time - started, event.data
        record.messages.append((at, 0))  # its tokens are filled in below when it carries content
        if data == "[DONE]":
            finished = True
            continue
        try:
            chunk = json.loads(data)
            if "error" in chunk:
                fail(record, "server_error", error_message(data), at)
                continue
            text = content(chunk, chat)
            usage = chunk.get("usage")
        except (ValueError, AttributeError, TypeError) as e:
            fail(record, "bad_event", f"{type(e).__name__}: {data[:200]}", at)
            continue
        tokens = 1
        if usage:
            completion = int(usage.get("completion_tokens") or 0)
            tokens, seen_tokens = completion - seen_tokens, completion
            record.output_tokens = completion
            record.prompt_tokens = usage.get("prompt_tokens")
            if not continuous:
                tokens = 1  # a final usage chunk counts the whole stream, not this message
        if text:
            pieces.append(text)
            record.messages[-1] = (at, max(tokens, 1))
            record.counted_output_tokens += max(tokens, 1)
        running = running or bool(continuous and usage and chunk.get("choices"))
        if not text and continuous and usage and tokens > 0 and chunk.get("choices"):
            # A token without text (a UTF-8 character cut in two, say): the usage counts it, so
            # does the check; it shows the reader nothing, so it times no content message.
            record.counted_output_tokens += tokens
    if not running and record.output_tokens is not None:
        # One token per content message is only a floor: a token may stream without text, or
        # several in one message. The final usage is the count, unless the stream held more.
        record.counted_output_tokens = max(record.counted_output_tokens, record.output_tokens)
    record.end = time.perf_counter() - started
    if record.error_kind is None and record.first_token is None:
        fail(record, "no_output", "the stream ended without a token", record.end)
    elif record.error_kind is None and not finished:
        fail(record, "stream_cut", "the stream ended without data: [DONE]", record.end)
    return "".join(pieces)


def read_whole(body: bytes, record: RequestRecord, started: float, chat: bool) -> str:
    """A non-streamed answer: one message at its end, carrying every output token."""
    record.end = time.perf_counter() - started
    try:
        answer = json.loads(body)
        choices = answer.get("choices") or []
        if chat:
            text = "".join((c.get("message") or {}).get("content") or "" for c in choices)
        else:
            text = "".join(c.get("text") or "" for c in choices)
        usage = answer.get("usage") or {}
    except (ValueError, AttributeError, TypeError) as e:
        fail(record, "bad_event", f"{type(e).__name__}: {body[:200]!r}", record.end)
        return ""
    record.prompt_tokens = usage.get("prompt_tokens")
    record.output_tokens = usage.get("completion_tokens")
    tokens = record.output_tokens or (1 if text else 0)
    if not text and not tokens:
        fail(record, "no_output", "the response holds no output", record.end)
        return ""
    record.messages.append((record.end, max(tokens, 1)))
    record.counted_output_tokens = max(tokens, 1)
    return text


def content(chunk: dict[str, Any], chat: bool) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        if chat:
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or delta.get("reasoning_content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


def fail(record: RequestRecord, kind: str, message: str, at: float) -> None:
    if record.error_kind is None:
        record.error_kind, record.error = kind, message[:500]
    record.end = at


def status_kind(status: int) -> str:
    if status == 429:
        return "http_429"
    return "http_5xx" if status >= 500 else "http_4xx"


def error_message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except (ValueError, AttributeError):
        pass
    return text[:300]
