"""The files of a batch job, in OpenAI's Batch format: input lines in, results and errors out.

Input, one request per line::

    {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...]}}

Output, one line per request that got a 2xx answer::

    {"id": "batch_req_...", "custom_id": "q-1", "response": {"status_code": 200, "request_id": "...",
     "body": {...}}, "error": null}

Errors, one line per input line that could not be run (``line`` is its number,
from 1) or request that failed for good: ``response`` holds the server's
answer when there was one, ``error`` a code and message otherwise.

Resuming reads what an earlier run wrote: a custom_id in the output, or in the
errors with a final failure (a bad line, a 4xx), is not sent again; failures
that another try may cure (429, 5xx, no connection) are dropped from the
errors file and retried. A line cut short by a crash is cut off.

Both results files must be regular files (``check_results_file``): resuming
reads them whole and truncates them, which a device such as /dev/full (endless
zeros) or /dev/stdout cannot take.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.protocol.text import utf8_encodable

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class BadLine(Exception):
    """An input line that cannot be run: the message names the field and what is allowed."""

    def __init__(self, message: str, code: str, custom_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id


@dataclass(frozen=True, slots=True)
class BatchRequest:
    line: int  # from 1
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_line(line_no: int, raw: bytes) -> BatchRequest:
    try:
        item = json.loads(raw)
    except ValueError as e:
        raise BadLine(f"line {line_no} is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(item, dict):
        raise BadLine(f"line {line_no} must be a JSON object", "invalid_json")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(f"line {line_no}: custom_id must be a non-empty string", "invalid_custom_id")
    if not utf8_encodable(custom_id):  # a lone surrogate such as "\ud800": no file could hold it
        raise BadLine(
            f"line {line_no}: custom_id={custom_id!r} is invalid: allowed text without lone surrogates",
            "invalid_custom_id",
        )
    method = item.get("method", "POST")
    if method != "POST":
        raise BadLine(
            f"line {line_no}: method={method!r} is invalid: allowed 'POST'", "invalid_method", custom_id
        )
    url = item.get("url")
    if url not in ENDPOINTS:
        allowed = ", ".join(ENDPOINTS)
        raise BadLine(f"line {line_no}: url={url!r} is invalid: allowed {allowed}", "invalid_url", custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadLine(f"line {line_no}: body must be a JSON object", "invalid_body", custom_id)
    if body.get("stream"):
        raise BadLine(
            f"line {line_no}: body.stream must be false or absent in a batch", "invalid_body", custom_id
        )
    return BatchRequest(line_no, custom_id, url, body)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their numbers, read as the job goes (memory stays flat)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def count_lines(path: Path) -> int:
    """The lines ``read_lines`` yields (blank ones are not requests), for a progress bar's total."""
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def dump_record(record: dict[str, Any]) -> bytes:
    """One results line: UTF-8 JSON; ASCII escapes when a text holds a lone surrogate (a server may
    send ``"\\ud800"``), which UTF-8 cannot encode but JSON's escape carries back unchanged."""
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def check_results_file(path: Path, option: str) -> None:
    """Raise ValueError naming ``option`` unless ``path`` is a regular file that can be appended to,
    or a new file in a folder that exists and can be written to."""
    allowed = "allowed a regular file, new or existing, in a folder that exists and can be written to"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        parent = path.parent
        if not parent.is_dir():
            raise ValueError(
                f"{option} {path} is invalid: folder {parent} does not exist; {allowed}"
            ) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(
                f"{option} {path} is invalid: folder {parent} is not writable; {allowed}"
            ) from None
        return
    except OSError as e:  # a path through a file, a loop of links, no permission
        raise ValueError(f"{option} {path} is invalid: {(e.strerror or str(e)).lower()}; {allowed}") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{option} {path} is invalid: it is a folder; {allowed}")
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{option} {path} is invalid: it is not a regular file (a device, a pipe); {allowed}"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"{option} {path} is invalid: it cannot be read and written; {allowed}")


class SeenIds:
    """custom_ids as 64-bit digests: ~70 bytes each in memory, whatever their length."""

    def __init__(self) -> None:
        self._digests: set[int] = set()

    @staticmethod
    def _digest(custom_id: str) -> int:
        # surrogatepass: an id read back from an earlier run's file may hold a lone surrogate
        data = custom_id.encode("utf-8", "surrogatepass")
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    def add(self, custom_id: str) -> bool:
        """False if it was there already."""
        digest = self._digest(custom_id)
        if digest in self._digests:
            return False
        self._digests.add(digest)
        return True

    def __contains__(self, custom_id: str) -> bool:
        return self._digest(custom_id) in self._digests

    def __len__(self) -> int:
        return len(self._digests)


@dataclass
class ResumeState:
    done: SeenIds  # custom_ids not to send again
    bad_lines: set[int]  # input lines already reported as bad
    succeeded: int
    failed: int


def resume(output: Path, errors: Path) -> ResumeState:
    """What earlier runs finished; both files are left ready to append to."""
    done = SeenIds()
    succeeded = failed = 0
    bad_lines: set[int] = set()
    for record in _records(output):
        custom_id = record.get("custom_id")
        if isinstance(custom_id, str):
            done.add(custom_id)
            succeeded += 1
    kept: list[bytes] = []
    for record in _records(errors):
        if record.get("retryable"):
            continue  # tried again this run
        kept.append(dump_record(record))
        failed += 1
        if record.get("bad_line"):
            line = record.get("line")
            bad_lines.add(line if isinstance(line, int) else 0)
        elif record.get("custom_id") is not None:
            done.add(str(record["custom_id"]))
    if errors.exists():
        tmp = errors.with_name(errors.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, errors)
    return ResumeState(done, bad_lines, succeeded, failed)


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The whole records of a results file; a last line cut short by a crash is removed."""
    if not path.exists():
        return
    _cut_partial_line(path)
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def _cut_partial_line(path: Path) -> None:
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline; everything after it is a half-written record.
        position = size
        while position > 0:
            step = min(65536, position)
            f.seek(position - step)
            block = f.read(step)
            index = block.rfind(b"\n")
            if index >= 0:
                f.truncate(position - step + index + 1)
                return
            position -= step
        f.truncate(0)
