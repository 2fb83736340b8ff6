"""Reading a response's token usage as it passes through the gateway, for the ledger.

Whole responses carry ``usage`` in their JSON. Streams carry it only when asked
(``stream_options.include_usage``), in a last chunk with no choices; the
gateway always asks, and if the client had not, drops that chunk on the way
back, so the client sees the stream it asked for and every token is counted.
Everything else passes through as it came (when a usage chunk may have to be
dropped, as whole events: the same bytes, or the same events re-encoded).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from tokenmill.client.sse import SSEDecoder, SSEEvent

MAX_WHOLE_BODY = 16 << 20  # bytes of a whole response kept to read its usage
MAX_TOKENS = 1 << 40  # a worker's usage figure past this is not believed (nor storable as it comes)


def ask_for_usage(request: dict[str, Any]) -> bool:
    """Make a streaming request report usage; True if the client asked for it itself."""
    if not request.get("stream"):
        return True
    options = request.get("stream_options")
    if not isinstance(options, dict):
        options = {}
    asked = options.get("include_usage") is True
    request["stream_options"] = {**options, "include_usage": True}
    return asked


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seen: bool = False


def charged(
    usage: Usage,
    prompt_estimate: int,
    reserved: int,
    status: str,
    http_status: int | None,
    worker: str | None,
    chunks: int | None,
) -> tuple[int, int]:
    """The prompt and completion tokens a gateway request that ended is charged: what the worker
    reported, else what it must have done. ``prompt_estimate``: the router's; ``reserved``: all the
    request reserved; ``status``: how it ended (``router/call.py``'s Outcome); ``chunks``: content
    chunks the client was sent (None for a whole answer, which has none to count)."""
    if usage.seen:
        return usage.prompt_tokens, usage.completion_tokens
    if http_status is not None and http_status < 400:
        # Cut short, or a worker that reports no usage: what it must have done. For a whole
        # answer that is all it reserved (erring high, as the estimates do): 0 let n=4 and
        # 1,000 tokens pass for the prompt alone.
        return prompt_estimate, chunks if chunks is not None else reserved - prompt_estimate
    if status in ("cancelled", "unavailable", "ledger_error") and worker is not None:
        # No answer, while a worker had the request: the client left, the worker failed (died
        # mid-request) and so did any other tried, or the ledger failed (a 503 after the
        # worker's head; else retries got compute nobody counted). It read the prompt at least
        # (what it made before its connection closed is not known); a worker that refused the
        # connection read nothing, but cannot be told apart here: erring high, as the estimate does.
        return prompt_estimate, 0
    return 0, 0  # refused by the worker or never reached one


class UsageMeter:
    """Fed the response body as it arrives; gives back the bytes to send the client."""

    def __init__(self, sse: bool, client_wants_usage: bool) -> None:
        self.sse = sse
        self.keep_usage_chunk = client_wants_usage
        self.usage = Usage()
        self.events = 0  # events with content: the completion estimate when no usage comes
        self._decoder = SSEDecoder() if sse else None
        self._whole: list[bytes] = []
        self._whole_size = 0
        self._line = b""  # the start of a line a chunk cut (keep_usage_chunk streams)
        self._plain_lines = True  # LF line ends only, so far: _scan reads them

    def feed(self, data: bytes) -> bytes:
        if self._decoder is None:
            if self._whole_size < MAX_WHOLE_BODY:
                self._whole.append(data)
                self._whole_size += len(data)
            return data
        if self.keep_usage_chunk:  # nothing to drop: the bytes as they came
            if self._plain_lines and b"\r" not in data:
                self._scan(data)
                return data
            # CR line ends (SSE allows them): the decoder from here on, from the line _scan left.
            self._plain_lines, unread, self._line = False, self._line, b""
            for event in self._decoder.feed(unread + data, time.perf_counter()):
                self._read(event)
            return data
        if data.endswith(b"\n\n") and b'"usage"' not in data and not self._decoder.has_partial_event:
            # Whole events and no usage among them (nearly every chunk): through untouched, unparsed.
            self.events += data.count(b"data: ") - data.count(b"data: [DONE]")
            return data
        events = self._decoder.feed(data, time.perf_counter())
        # Whole events only (a partial one waits for its end), rebuilt without the usage chunk.
        return b"".join(_encode(e) for e in events if not self._read(e))

    def finish(self) -> None:
        """The body ended: read a whole response's usage."""
        if self._decoder is None and self._whole:
            body = b"".join(self._whole)
            usage = last_member_usage(body)
            if usage is None:  # not where servers put it: the whole body parsed
                try:
                    whole = json.loads(body)
                except (ValueError, RecursionError):  # (a worker nesting past the parser's depth)
                    return
                usage = whole.get("usage") if isinstance(whole, dict) else None
            self._take(usage)

    def _scan(self, data: bytes) -> None:
        """A stream the client sees byte for byte: no events to rebuild, so only the lines that
        carry usage are parsed (OpenAI-compatible servers send each chunk as one ``data:`` line),
        and everything else is counted, not decoded."""
        lines = self._line + data if self._line else data
        end = lines.rfind(b"\n") + 1
        lines, self._line = lines[:end], lines[end:]
        if not lines:
            return
        self.events += lines.count(b"data:") - lines.count(b"[DONE]")
        if b'"usage"' not in lines:
            return
        for line in lines.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                self.events -= 1  # as _read counts: chunks with usage are not the estimate's
                try:
                    chunk = json.loads(line[5:])
                except (ValueError, RecursionError):  # (a worker nesting past the parser's depth)
                    continue
                if isinstance(chunk, dict):
                    self._take(chunk.get("usage"))

    def _read(self, event: SSEEvent) -> bool:
        """Note the event's usage; True if it is a usage-only chunk (no choices)."""
        if '"usage"' not in event.data:
            self.events += event.data != "[DONE]"
            return False
        try:
            chunk = json.loads(event.data)
        except (ValueError, RecursionError):  # (a worker nesting past the parser's depth)
            return False
        if not isinstance(chunk, dict):
            return False
        self._take(chunk.get("usage"))
        return chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)

    def _take(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
        if all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < MAX_TOKENS
            for n in (prompt, completion)
        ):
            self.usage.prompt_tokens, self.usage.completion_tokens = prompt, completion
            self.usage.seen = True  # otherwise the worker's figures are nonsense: the estimate stands


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_DECODER = json.JSONDecoder()


def last_member_usage(body: bytes) -> Any:
    """The value of a JSON object's ``usage`` when it is the object's last member, as
    OpenAI-compatible servers write it, read without parsing the rest (the choices, often most
    of the body); None when it is not last. (A match is the top-level member: in JSON, the bytes
    ``"usage"`` are a whole string, never part of one, and only the outermost object's last member
    is followed by one closing brace and the end.)"""
    at = body.rfind(b'"usage"')
    key = _USAGE_KEY.match(body, at) if at >= 0 else None
    if key is None:
        return None
    try:
        tail = body[key.end() :].decode()
        value, end = _DECODER.raw_decode(tail)
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    return value if tail[end:].strip() == "}" else None


def _encode(event: SSEEvent) -> bytes:
    head = f"event: {event.event}\n" if event.event != "message" else ""
    lines = "".join(f"data: {line}\n" for line in event.data.split("\n"))
    return (head + lines + "\n").encode()
