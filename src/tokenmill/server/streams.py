"""Engine streams under an HTTP request: open them, merge them, stop them when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.engine.input_processor import Prompt
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.request_stream import RequestStream
from tokenmill.engine.sampling_params import SamplingParams
from tokenmill.server.worker import Worker

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the response was ready; its requests were aborted."""


def open_streams(
    worker: Worker,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    request_id: str,
    priority: int,
    cache_salt: str | None,
    truncate_max_tokens: bool = True,
) -> list[RequestStream]:
    """Accept one engine request per prompt, or none: a bad prompt closes the ones already open.
    ``truncate_max_tokens=False``: a prompt leaving less room than ``params.max_tokens`` is refused."""
    worker.check_accepting()
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(worker.engine.open(prompt, params, rid, priority, cache_salt, truncate_max_tokens))
    except BaseException:
        close_all(streams)
        raise
    return streams


def close_all(streams: Sequence[RequestStream]) -> None:
    for s in streams:
        s.close()


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, each with the index of its stream."""
    if len(streams) == 1:  # the common case, without a task per stream
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def final_outputs(streams: Sequence[RequestStream]) -> list[RequestOutput]:
    """The last output of each stream (FINAL_ONLY streams send just that one)."""
    last: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        last[i] = out
    return [out for out in last if out is not None]


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client disconnects first; then cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled: so is its work
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected()


async def _wait_for_disconnect(request: Request) -> None:
    # The body was read already: what receive() brings now is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """``text/event-stream`` that always closes its body iterator, so engine streams are released
    however the response ends (finished, client gone, or a server that reports disconnects by error)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None):
        super().__init__(content, headers={"cache-control": "no-cache", **(headers or {})})
        self._body = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose: Any = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
