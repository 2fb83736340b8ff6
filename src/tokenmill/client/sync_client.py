"""``Client``: ``AsyncClient`` for code without an event loop.

Example, with ``tokenmill serve`` on 127.0.0.1:8000::

    from tokenmill.client import Client

    with Client("http://127.0.0.1:8000") as client:
        hi = [{"role": "user", "content": "Say hi"}]
        reply = client.chat.completions.create(messages=hi, max_tokens=16)
        print(reply.choices[0].message.content)
        for chunk in client.completions.create(prompt="ROMEO:", max_tokens=32, stream=True):
            print(chunk.text, end="", flush=True)

The client runs its own event loop in a background thread, so its queue,
pacing and connections are shared by every thread that calls it: one
``Client`` per process is the way to keep workers evenly fed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from tokenmill.client.async_client import AsyncClient, AsyncStream
from tokenmill.client.monitor import MonitorReport
from tokenmill.client.openai_types import ChatCompletion, ChatCompletionChunk, Completion

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tokenmill-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Stream(Generic[T]):
    """The chunks of a streamed response; leaving early (``break``, ``close``) aborts the request."""

    def __init__(self, loop: _LoopThread, stream: AsyncStream[T]):
        self._loop = loop
        self._stream = stream

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._loop.run(self._stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    def close(self) -> None:
        self._loop.run(self._stream.aclose())

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    def __init__(self, base_url: str | Sequence[str] = "http://127.0.0.1:8000", **options: Any):
        """The same arguments as ``AsyncClient``."""
        self._loop = _LoopThread()
        try:
            self._async = AsyncClient(base_url, **options)
        except BaseException:
            self._loop.stop()
            raise
        self.chat = _Chat(self)
        self.completions = Completions(self)

    @property
    def concurrency_limit(self) -> int:
        return self._async.concurrency_limit

    def report(self) -> MonitorReport:
        return self._loop.run(_report(self._async))

    def close(self) -> None:
        if self._loop.loop.is_closed():
            return
        self._loop.run(self._async.aclose())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _result(self, coro: Coroutine[Any, Any, Any]) -> Any:
        result = self._loop.run(coro)
        return Stream(self._loop, result) if isinstance(result, AsyncStream) else result


class ChatCompletions:
    def __init__(self, client: Client):
        self._client = client

    def create(
        self, *, messages: Sequence[Mapping[str, Any]], stream: bool = False, **params: Any
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """See ``AsyncChatCompletions.create``."""
        return self._client._result(
            self._client._async.chat.completions.create(messages=messages, stream=stream, **params)
        )


class Completions:
    def __init__(self, client: Client):
        self._client = client

    def create(
        self, *, prompt: str | list[int], stream: bool = False, **params: Any
    ) -> Completion | Stream[Completion]:
        """See ``AsyncCompletions.create``."""
        return self._client._result(
            self._client._async.completions.create(prompt=prompt, stream=stream, **params)
        )


class _Chat:
    def __init__(self, client: Client):
        self.completions = ChatCompletions(client)


async def _report(client: AsyncClient) -> MonitorReport:
    return client.report()
