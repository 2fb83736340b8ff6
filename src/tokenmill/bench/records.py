"""The raw event log of a benchmark run: one record per request, one JSON line each.

Every metric of a report is derived from these records (``bench/metrics.py``),
so another tool's definition can be recomputed from the same log. Times are
seconds from the run's start (``time.perf_counter()`` based), so a log from one
machine compares with itself, never with wall clocks elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

LOG_VERSION = 1


@dataclass
class RequestRecord:
    """One request as the client saw it."""

    index: int
    intended: float | None  # when the schedule meant to send it (open loop); None in closed loop
    sent: float | None = None  # when its bytes were written; None if it never went out
    queued: float = 0.0  # seconds it waited for a free slot under --max-concurrency (the server's backlog)
    first_byte: float | None = None  # the response's first byte (status line)
    end: float | None = None  # the response's last byte, or the failure
    status: int | None = None  # HTTP status
    # (arrival, output tokens) per SSE message, every one: those without content (the role-only
    # chunk, the usage chunk, [DONE]) carry 0 tokens, so a first-event TTFT can be recomputed.
    messages: list[tuple[float, int]] = field(default_factory=list)
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from the server's usage
    expected_prompt_tokens: int | None = None  # what the data source built
    expected_output_tokens: int | None = None  # max_tokens asked for
    # What the stream accounts for, a check on the usage: the usage deltas with continuous usage
    # (tokens without text included), else the final usage or, if more, the content messages.
    counted_output_tokens: int = 0
    error_kind: str | None = None  # see ERROR_KINDS
    error: str | None = None
    worker: str | None = None  # x-tokenmill-worker, when the server sends it
    user: str | None = None  # the data's user or session id, for per-user figures
    turn: int | None = None  # the turn within its session (multi-turn data)
    retokenized_output_tokens: int | None = (
        None  # the reply's text through a tokenizer (a sample, as a check)
    )

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def anchor(self) -> float | None:
        """Where latencies start: the intended send time in open loop (no coordinated omission)."""
        return self.intended if self.intended is not None else self.sent

    @property
    def content(self) -> list[tuple[float, int]]:
        """The messages that carried output tokens: what TTFT, TPOT and ITL are timed by."""
        return [m for m in self.messages if m[1] > 0]

    @property
    def first_token(self) -> float | None:
        return next((t for t, n in self.messages if n > 0), None)

    @property
    def last_token(self) -> float | None:
        return next((t for t, n in reversed(self.messages) if n > 0), None)

    @property
    def dispatched(self) -> float | None:
        """When the client issued it: the send, less any wait for a slot under --max-concurrency."""
        return None if self.sent is None else self.sent - self.queued

    @property
    def num_output_tokens(self) -> int:
        """The server's count when it gave one, else what the messages carried."""
        return self.output_tokens if self.output_tokens is not None else self.counted_output_tokens

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["messages"] = [[round(t, 6), n] for t, n in self.messages]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestRecord:
        d = dict(d)
        d["messages"] = [(float(t), int(n)) for t, n in d.get("messages", [])]
        return cls(**d)


# What a failed request is counted as, so a report can say which failures dominated.
ERROR_KINDS = {
    "connect": "the server could not be reached",
    "timeout": "no byte for longer than the read timeout",
    "http_4xx": "the server answered with a 4xx status (429 counted apart)",
    "http_429": "the server was overloaded (429)",
    "http_5xx": "the server answered with a 5xx status",
    "protocol": "the connection closed mid-response, or the bytes were not HTTP",
    "not_streamed": "a streamed request got a response that was not an event stream",
    "bad_event": "an event that is not the JSON an OpenAI stream sends",
    "server_error": "an error event inside the stream",
    "no_output": "the stream ended without a token",
    "stream_cut": "the stream ended cleanly but before data: [DONE] (a reply cut short)",
    "cancelled": "the run stopped before the response ended (Ctrl-C or the run's time limit)",
}


def write_log(path: Path, header: dict[str, Any], records: Iterable[RequestRecord]) -> None:
    """The header line (run settings), then one line per request."""
    with path.open("w", encoding="utf-8") as f:
        write_header(f, header)
        for record in records:
            write_record(f, record)


def write_header(f: IO[str], header: dict[str, Any]) -> None:
    f.write(json.dumps({"tokenmill_bench_log": LOG_VERSION, **header}, ensure_ascii=False) + "\n")


def write_record(f: IO[str], record: RequestRecord) -> None:
    f.write(json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n")


def read_log(path: Path) -> tuple[dict[str, Any], list[RequestRecord]]:
    """The header and the records of a log written by ``write_log``; a run's ``PREFIX.json``
    stands for the log beside it. Errors name the file and the line."""
    given, path = path, log_path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, not a tokenmill bench log") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: give a run's PREFIX.events.jsonl or PREFIX.json") from None
    except FileNotFoundError:
        raise ValueError(_missing(given, path)) from None
    if not lines:
        raise ValueError(f"{path} is empty, not a tokenmill bench log")
    try:
        header = json.loads(lines[0])
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("tokenmill_bench_log") != LOG_VERSION:
        raise ValueError(f"{path} is not a tokenmill bench log (version {LOG_VERSION}): line 1 is no header")
    records = []
    for lineno, line in enumerate(lines[1:], 2):
        if line.strip():
            try:
                records.append(RequestRecord.from_json(json.loads(line)))
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: not a request record ({e})") from None
    return header, records


def _missing(given: Path, path: Path) -> str:
    """Why there is no log to read, and where it may be: a sweep writes no PREFIX.json, only
    PREFIX.N.json per point."""
    if given != path and given.exists():
        why = f"{given}: no event log {path.name} beside it (written by tokenmill bench run -o)"
    else:
        why = f"{given}: no such file"
    stem = path.name.removesuffix(".events.jsonl")
    if path.with_name(f"{stem}.0.events.jsonl").exists():
        why += f"; {stem} is a sweep: give one of its points, such as {path.with_name(stem + '.0.json')}"
    return why


def log_path(path: Path) -> Path:
    """A run's event log: ``path`` itself, or the ``PREFIX.events.jsonl`` beside a ``PREFIX.json``."""
    if path.name.endswith(".json"):
        return path.with_name(path.name.removesuffix(".json") + ".events.jsonl")
    return path
