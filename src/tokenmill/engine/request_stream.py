"""What passes between a caller's event loop and the engine thread (``async_engine.py``): the
commands the step loop applies between steps, and the stream of one request's outputs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engine.input_processor import PreparedRequest
from tokenmill.engine.kv_events import KVEventBatch
from tokenmill.engine.outputs import RequestOutput


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
