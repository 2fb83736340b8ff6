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
    check_results_file,
    dump_record,
    parse_line,
    read_lines,
    resume,
)
from tokenmill.client.http_errors import ConnectError, TransportError
from tokenmill.client.rate_limit import QuotaExceeded
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
    failed_before: int = 0  # of ``skipped``: lines an earlier run failed for good (in the errors file)


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
        check_results_file(self.output_path, "output_path")
        check_results_file(self.errors_path, "errors_path")
        state = resume(self.output_path, self.errors_path)
        seen = SeenIds()  # custom_ids of this pass over the input
        pending: set[asyncio.Task[None]] = set()
        crashed: list[BaseException] = []  # what a task raised past _one's own handling

        def finished(task: asyncio.Task[None]) -> None:
            pending.discard(task)
            if not task.cancelled() and (e := task.exception()) is not None:
                crashed.append(e)  # retrieved here; raised by run once the others are stopped

        p = self.progress
        with self.output_path.open("ab") as out, self.errors_path.open("ab") as errors:
            try:
                for line_no, raw in read_lines(self.input_path):
                    if self._stop or crashed:
                        break
                    request = self._admit(line_no, raw, state, seen, errors)
                    if request is not None:
                        task = asyncio.create_task(self._one(request, out, errors))
                        pending.add(task)
                        task.add_done_callback(finished)
                    while len(pending) >= self.client.concurrency_limit + self.prefetch:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    self._report(on_progress)
                while pending and not crashed:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    self._report(on_progress)
            finally:
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        if crashed:  # e.g. the disk is full: the results cannot be written, so the job cannot go on
            raise crashed[0]
        self._report(on_progress)
        return BatchSummary(
            p.succeeded, p.failed, p.skipped, p.prompt_tokens, p.completion_tokens,
            time.monotonic() - p.started, self._stop, state.failed,
        )  # fmt: skip

    def _admit(
        self, line_no: int, raw: bytes, state: ResumeState, seen: SeenIds, errors: IO[bytes]
    ) -> BatchRequest | None:
        """The request on this line, or None if it was done before or cannot be run."""
        p = self.progress
        try:
            request = parse_line(line_no, raw)
        except BadLine as e:
            # A bad line's custom_id is taken too: a later line with the same one is its duplicate,
            # or the id would be in both the errors and the output.
            if e.custom_id is not None:
                seen.add(e.custom_id)
            if line_no in state.bad_lines:
                p.skipped += 1
            else:
                self._error(errors, e.custom_id, line_no, code=e.code, message=str(e), bad_line=True)
            return None
        if line_no in state.bad_lines:  # (a duplicate, reported by an earlier run)
            seen.add(request.custom_id)
            p.skipped += 1
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
        """Send one request and record its result: every line ends in the output or the errors."""
        try:
            call = self.client.prepare_call(request.url, dict(request.body))
        except Exception as e:  # a body the client cannot read (max_tokens "abc", messages 5, ...)
            message = f"line {request.line}: the request could not be prepared: {type(e).__name__}: {e}"
            self._error(errors, request.custom_id, request.line, code="invalid_body", message=message)
            return
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
        except QuotaExceeded as e:
            # The run's quota, not the line, is at fault: a run with a larger one sends it again.
            message = f"line {request.line}: {e}"
            self._error(
                errors, request.custom_id, request.line, code="exceeds_quota", message=message, retryable=True
            )
            return
        except UnicodeEncodeError:  # a text in the body holds a lone surrogate ("\ud800"): the line's fault
            message = f"line {request.line}: body holds text with a lone surrogate, which UTF-8 cannot send"
            self._error(errors, request.custom_id, request.line, code="invalid_body", message=message)
            return
        except Exception as e:  # anything else on the way (an answer the client could not read)
            message = f"line {request.line}: the request failed: {type(e).__name__}: {e}"
            self._error(
                errors, request.custom_id, request.line, code="client_error", message=message, retryable=True
            )
            return
        self._record(request, reply.data, out, errors)

    def _record(self, request: BatchRequest, data: Any, out: IO[bytes], errors: IO[bytes]) -> None:
        """A 2xx answer: to the output with its usage counted, or to the errors if it is no
        OpenAI response (not an object, usage counts that are not counts)."""
        usage = data.get("usage") if isinstance(data, dict) else None
        counts = _usage_counts(usage) if isinstance(data, dict) else None
        if counts is None:
            message = (
                f"line {request.line}: the server's 200 answer is not an OpenAI response "
                "(allowed: an object whose usage holds whole-number prompt_tokens and completion_tokens)"
            )
            response = {"status_code": 200, "request_id": None, "body": data}
            # The server's fault, like a 5xx: another run asks again.
            self._error(
                errors, request.custom_id, request.line,
                code="invalid_response", message=message, response=response, retryable=True,
            )  # fmt: skip
            return
        p = self.progress
        p.prompt_tokens += counts[0]
        p.completion_tokens += counts[1]
        p.succeeded += 1
        record = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": data.get("id"), "body": data},
            "error": None,
        }
        out.write(dump_record(record))
        out.flush()

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
            "error": {"code": code, "message": message} if code else None,
            "code": code or (response and f"http_{response['status_code']}"),
            "retryable": retryable,
        }
        if bad_line:
            record["bad_line"] = True
        errors.write(dump_record(record))
        errors.flush()

    def _report(self, on_progress: Callable[[BatchProgress], None] | None) -> None:
        self.progress.concurrency_limit = self.client.concurrency_limit
        self.progress.in_flight = self.client.dispatcher.gate.in_flight
        if on_progress is not None:
            on_progress(self.progress)


def _usage_counts(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a response's usage (absent: 0), None if they are not counts."""
    if usage is None:
        return 0, 0
    if not isinstance(usage, dict):
        return None
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name)
        if value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return None
        counts.append(value)
    return counts[0], counts[1]


def _retryable_later(e: APIError) -> bool:
    # 401 is the key's fault, not the line's: a run with a good key must send it again.
    return e.status in (401, 408, 409, 429) or e.status >= 500
