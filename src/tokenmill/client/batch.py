"""Batch jobs: millions of OpenAI Batch-format requests through the client's paced queue.

Example (``tokenmill batch run`` does the same with a progress bar)::

    import asyncio
    from pathlib import Path

    from tokenmill.client import AsyncClient
    from tokenmill.client.batch import BatchJob


    async def main() -> None:
        async with AsyncClient("http://127.0.0.1:8000") as client:
            job = BatchJob(client, Path("input.jsonl"), Path("output.jsonl"), Path("errors.jsonl"))
            summary = await job.run()
            print(summary)


    asyncio.run(main())

The input is read as the job goes and only ``limit + prefetch`` requests are
ever held, so memory stays flat however long the file; the output and error
files are appended to and flushed line by line, so an interrupted job resumes
where it stopped (see ``batch_files``). Two things stop a job early rather
than fail every line: a key the server refuses (401), and endpoints that
cannot be reached once the client's retries are spent; what finished is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tokenmill.client.async_client import AsyncClient
from tokenmill.client.batch_files import (
    BadLine,
    BatchRequest,
    ResumeState,
    SeenIds,
    parse_line,
    read_lines,
    resume,
)
from tokenmill.client.http_errors import ConnectError, TransportError
from tokenmill.protocol.errors import APIError


class BatchStopped(Exception):
    """The job cannot go on (a refused key, no endpoint reachable); what finished is kept."""


@dataclass
class BatchProgress:
    total_lines: int | None = None
    skipped: int = 0  # finished by an earlier run
    succeeded: int = 0
    failed: int = 0  # bad lines and failed requests
    in_flight: int = 0  # sent and not yet answered
    prompt_tokens: int = 0
    completion_tokens: int = 0
    concurrency_limit: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.skipped + self.succeeded + self.failed


@dataclass(frozen=True, slots=True)
class BatchSummary:
    succeeded: int
    failed: int
    skipped: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    stopped: str | None  # why the job stopped early, or None


class BatchJob:
    def __init__(
        self,
        client: AsyncClient,
        input_path: Path,
        output_path: Path,
        errors_path: Path,
        *,
        prefetch: int = 64,
        total_lines: int | None = None,
    ):
        self.client = client
        self.input_path = input_path
        self.output_path = output_path
        self.errors_path = errors_path
        self.prefetch = prefetch
        self.progress = BatchProgress(total_lines)
        self._stop: str | None = None

    async def run(self, on_progress: Callable[[BatchProgress], None] | None = None) -> BatchSummary:
        if not self.input_path.is_file():
            raise FileNotFoundError(f"input file {self.input_path} does not exist")
        state = resume(self.output_path, self.errors_path)
        seen = SeenIds()  # custom_ids of this pass over the input
        pending: set[asyncio.Task[None]] = set()
        p = self.progress
        with self.output_path.open("ab") as out, self.errors_path.open("ab") as errors:
            try:
                for line_no, raw in read_lines(self.input_path):
                    if self._stop:
                        break
                    request = self._admit(line_no, raw, state, seen, errors)
                    if request is not None:
                        task = asyncio.create_task(self._one(request, out, errors))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                    while len(pending) >= self.client.concurrency_limit + self.prefetch:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    self._report(on_progress)
                while pending:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    self._report(on_progress)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        self._report(on_progress)
        return BatchSummary(
            p.succeeded, p.failed, p.skipped, p.prompt_tokens, p.completion_tokens,
            time.monotonic() - p.started, self._stop,
        )  # fmt: skip

    def _admit(
        self, line_no: int, raw: bytes, state: ResumeState, seen: SeenIds, errors: IO[bytes]
    ) -> BatchRequest | None:
        """The request on this line, or None if it was done before or cannot be run."""
        p = self.progress
        if line_no in state.bad_lines:
            p.skipped += 1
            return None
        try:
            request = parse_line(line_no, raw)
        except BadLine as e:
            self._error(errors, e.custom_id, line_no, code=e.code, message=str(e), bad_line=True)
            return None
        if not seen.add(request.custom_id):
            message = f"line {line_no}: custom_id={request.custom_id!r} appeared on an earlier line"
            self._error(
                errors, request.custom_id, line_no, code="duplicate_custom_id", message=message, bad_line=True
            )
            return None
        if request.custom_id in state.done:
            p.skipped += 1
            return None
        return request

    async def _one(self, request: BatchRequest, out: IO[bytes], errors: IO[bytes]) -> None:
        p = self.progress
        call = self.client.prepare_call(request.url, dict(request.body))
        try:
            reply = await self.client.dispatcher.request(call)
        except APIError as e:
            if e.status == 401:
                where = getattr(e, "endpoint", "the server")
                self._stop = f"{where} refused the API key (401): {e.message}"
            self._error(
                errors, request.custom_id, request.line,
                response={"status_code": e.status, "request_id": None, "body": e.to_body()},
                retryable=_retryable_later(e),
            )  # fmt: skip
            return
        except TransportError as e:
            if isinstance(e, ConnectError):
                self._stop = f"no endpoint could be reached: {e}"
            self._error(
                errors, request.custom_id, request.line, code=type(e).__name__, message=str(e), retryable=True
            )
            return
        usage = reply.data.get("usage") or {}
        p.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        p.completion_tokens += int(usage.get("completion_tokens") or 0)
        p.succeeded += 1
        record = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": reply.data.get("id"), "body": reply.data},
            "error": None,
        }
        _write(out, record)

    def _error(
        self,
        errors: IO[bytes],
        custom_id: str | None,
        line: int,
        *,
        code: str | None = None,
        message: str | None = None,
        response: dict[str, Any] | None = None,
        retryable: bool = False,
        bad_line: bool = False,
    ) -> None:
        self.progress.failed += 1
        record: dict[str, Any] = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": custom_id,
            "line": line,
            "response": response,
            "error": None if response else {"code": code, "message": message},
            "code": code or (response and f"http_{response['status_code']}"),
            "retryable": retryable,
        }
        if bad_line:
            record["bad_line"] = True
        _write(errors, record)

    def _report(self, on_progress: Callable[[BatchProgress], None] | None) -> None:
        self.progress.concurrency_limit = self.client.concurrency_limit
        self.progress.in_flight = self.client.dispatcher.gate.in_flight
        if on_progress is not None:
            on_progress(self.progress)


def _write(f: IO[bytes], record: dict[str, Any]) -> None:
    f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
    f.flush()


def _retryable_later(e: APIError) -> bool:
    # 401 is the key's fault, not the line's: a run with a good key must send it again.
    return e.status in (401, 408, 409, 429) or e.status >= 500
