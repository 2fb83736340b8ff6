"""What passes between a caller's event loop and the engine thread (``async_engine.py``): the
commands the step loop applies between steps, the stream of one request's outputs and the
hand-over of a step's outputs to the callers' loops, and what a listener of every step sees."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.engine.input_processor import PreparedRequest
from tokenmill.engine.kv_events import KVEventBatch
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.stats import EngineStats, StepRecord


class EngineListener(Protocol):
    """Sees every step and every finished request, in the engine's thread: keep it cheap."""

    def on_step(self, record: StepRecord, stats: EngineStats) -> None: ...

    def on_request_finished(self, output: RequestOutput) -> None: ...


@dataclass
class StreamState:
    """A request's outputs on their way to its caller: the engine thread puts them on ``queue``
    through ``loop`` (the caller's), and ``finished`` once the last one is sent."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    finished: bool = False


@dataclass(frozen=True)
class AddRequest:
    """A validated, tokenized request for the scheduler."""

    prepared: PreparedRequest


@dataclass(frozen=True)
class AbortRequest:
    """Stop a request and free its blocks; ``done`` (in ``loop``) learns whether it was running."""

    request_id: str
    loop: asyncio.AbstractEventLoop | None = None
    done: asyncio.Future[bool] | None = None


@dataclass(frozen=True)
class ResetPrefixCache:
    """Forget every cached block no request holds."""


@dataclass(frozen=True)
class SubscribeKV:
    """Join the KV event subscribers, first receiving what is cached now, in one engine-thread move."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[KVEventBatch]
    done: asyncio.Future[bool]


class RequestStream:
    """The outputs of one accepted request (see ``AsyncEngine.open``)."""

    def __init__(self, stream: StreamState, release: Callable[[StreamState], None]):
        """``release``: the engine's, called once when the caller stops listening."""
        self._stream = stream
        self._release = release
        self._done = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.close()
        return item

    def close(self) -> None:
        """Stop listening; a request that has not finished is aborted. Idempotent."""
        if not self._done:
            self._done = True
            self._release(self._stream)


def put_all(items: list[tuple[StreamState, RequestOutput]]) -> None:
    """A step's outputs into their streams' queues (in the callers' loop)."""
    for stream, out in items:
        stream.queue.put_nowait(out)


def resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    # A closed event loop raises RuntimeError: that caller is gone, nobody is listening.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)
