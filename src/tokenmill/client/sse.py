"""Server-sent events (the ``text/event-stream`` format OpenAI streams in), decoded from raw bytes.

Follows the WHATWG rules a browser's ``EventSource`` applies: lines end in
``\\n``, ``\\r\\n`` or ``\\r``; a blank line ends an event; ``data`` lines of one
event are joined with ``\\n``; a single space after the colon is dropped; lines
starting with ``:`` are comments; a field without a colon has an empty value.
``retry`` is parsed but not acted on (this client never reconnects a stream).

Each event carries the time the bytes that completed it arrived, which is what
a benchmark times tokens by: the decoder is fed straight from the socket.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    time: float  # time.perf_counter() when the blank line that ended the event arrived
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed body bytes as they arrive, get whole events back.

    Example::

        decoder = SSEDecoder()
        events = decoder.feed(b'data: {"a": 1}\\n\\nda', time.perf_counter())   # one event
        events = decoder.feed(b"ta: [DONE]\\n\\n", time.perf_counter())          # the next
    """

    __slots__ = ("_buffer", "_data", "_event", "_has_data", "_id", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False  # the last chunk ended in \r: a \n starting the next one belongs to it
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._has_data = False

    def feed(self, chunk: bytes, now: float) -> list[SSEEvent]:
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = chunk.endswith(b"\r")
        if b"\r" in chunk:  # rare: normalise line ends so the fast path below sees only \n
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SSEEvent] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = buffer[start:end]
            start = end + 1
            if not line:
                if self._has_data:
                    events.append(self._dispatch(now))
                else:  # a blank line with no data: the event is discarded, the type reset
                    self._event = ""
                continue
            self._field(line)
        self._buffer = buffer[start:]
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ':' a comment (servers send them as keep-alives)
            return
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", errors="replace"))
            self._has_data = True
        elif name == b"event":
            self._event = value.decode("utf-8", errors="replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", errors="replace")
        # "retry" and unknown fields are ignored, as the standard says

    def _dispatch(self, now: float) -> SSEEvent:
        data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
        event = SSEEvent(data, now, self._event or "message", self._id)
        self._data = []
        self._event = ""
        self._has_data = False
        return event

    @property
    def has_partial_event(self) -> bool:
        """Bytes or fields of an event that has not ended yet (a stream cut short leaves some)."""
        return bool(self._buffer) or self._has_data
