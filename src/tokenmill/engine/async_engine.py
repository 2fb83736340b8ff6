"""The engine as an asyncio service: a background thread steps it, callers stream results.

Example::

    engine = AsyncEngine(EngineConfig())
    async for out in engine.generate("ROMEO:", SamplingParams(max_tokens=32, output_kind=OutputKind.DELTA)):
        print(out.outputs[0].text, end="", flush=True)
    engine.shutdown()

Threads: requests are validated and tokenized in the caller's thread, so bad
input fails at once and costs the step loop nothing. Accepted requests and
aborts go to the loop through a command queue and are applied between steps.
The loop hands each step's outputs to the event loop of every caller with one
``call_soon_threadsafe`` per step. Torch releases the GIL in its kernels, so
the event loop keeps serving while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from tokenmill.engine.config import EngineConfig
from tokenmill.engine.engine import Engine, Prompt
from tokenmill.engine.errors import EngineDeadError, InvalidRequestError
from tokenmill.engine.kv_events import CachedBlocks, KVEventBatch
from tokenmill.engine.os_thread import ENGINE_THREAD, name_this_thread
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.request_stream import (
    AbortRequest,
    AddRequest,
    EngineListener,
    RequestStream,
    ResetPrefixCache,
    StreamState,
    SubscribeKV,
    call_soon,
    put_all,
    resolve,
)
from tokenmill.engine.sampling_params import OutputKind, SamplingParams
from tokenmill.engine.stats import EngineStats

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0  # the loop re-checks for shutdown this often when idle


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, engine: Engine | None = None):
        """Start the step loop; with no ``engine``, the loop's thread builds one from ``config``.

        Why the loop thread builds it: torch runs its kernels on an OpenMP team owned
        by the thread that calls them, and libgomp cuts its workers' spin-wait short
        once it manages more threads than there are CPUs. Loading the model in the
        caller's thread would leave a second team behind, so every kernel of every
        step would pay a futex wake-up: 13% of decode throughput on 2 cores. Pass a
        ready ``engine`` only when its thread will run no more torch work.
        """
        self.engine: Engine
        self._streams: dict[str, StreamState] = {}
        # Guards the streams, the pending count and the command queue against the loop
        # closing: a command is either queued while the loop still drains it, or refused.
        self._streams_lock = threading.Lock()
        self._closed = False
        self._commands: deque[AddRequest | AbortRequest | ResetPrefixCache | SubscribeKV] = deque()
        self._num_pending_adds = 0  # requests in _commands, not yet in the scheduler
        self._wake = threading.Event()
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._stats: EngineStats
        self._kv_subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[KVEventBatch]]] = []
        self._listeners: list[EngineListener] = []
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(config, engine), name="tokenmill-engine-loop", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    # -- public API -----------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes.

        Raises InvalidRequestError or EngineOverloadedError before anything is
        queued. Leaving the loop early (break, cancellation) aborts the request.
        With no ``params``, the model's defaults are used with DELTA outputs.
        """
        stream = self.open(prompt, params, request_id, priority, cache_salt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def open(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        truncate_max_tokens: bool = True,
    ) -> RequestStream:
        """Accept a request now and return its outputs as an async iterator.

        Unlike ``generate``, errors (InvalidRequestError, EngineOverloadedError)
        are raised by this call itself, so a server can answer 400 or 429 before
        it starts a response. Call from the event loop that will read the
        stream, and ``close()`` the stream when done with it: closing before the
        request finished aborts it and frees its blocks. ``truncate_max_tokens=False``: a max_tokens
        past what the context leaves after the prompt is refused (MaxTokensTooLargeError), not cut.
        """
        state = self._open(prompt, params, request_id, priority, cache_salt, truncate_max_tokens)
        return RequestStream(state, self._release)

    async def abort(self, request_id: str) -> bool:
        """Abort a request; returns once its blocks are freed (False if it was unknown or done)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._command(AbortRequest(request_id, loop, done))
        return await done

    async def abort_all(self) -> int:
        """Abort every request in flight (a drain's deadline has passed): each stream ends with
        finish reason ``abort``. Returns how many were aborted, once their blocks are freed."""
        with self._streams_lock:
            ids = list(self._streams)
        aborted = await asyncio.gather(*(self.abort(rid) for rid in ids))
        return sum(aborted)

    async def reset_prefix_cache(self) -> None:
        self._command(ResetPrefixCache())

    def stats(self) -> EngineStats:
        """The engine after its most recent step."""
        return self._stats

    async def kv_events(self) -> AsyncIterator[KVEventBatch]:
        """Every KV event batch from now on (needs ``EngineConfig(kv_events=True)``).

        The first batch holds one ``CachedBlocks`` event listing what the prefix
        cache holds at that moment; no event is lost or repeated between it and
        the batches that follow.
        """
        if not self.engine.config.kv_events:
            raise InvalidRequestError("kv_events", False, "True in EngineConfig to subscribe to KV events")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[KVEventBatch] = asyncio.Queue()
        subscribed: asyncio.Future[bool] = loop.create_future()
        self._command(SubscribeKV(loop, queue, subscribed))
        entry = (loop, queue)
        try:
            if not await subscribed:
                raise EngineDeadError("the engine stopped before the subscription started")
            while True:
                yield await queue.get()
        finally:
            with contextlib.suppress(ValueError):
                self._kv_subscribers.remove(entry)

    def add_listener(self, listener: EngineListener) -> None:
        """Call ``listener`` after every step and for every finished request (aborted ones too)."""
        self._listeners = [*self._listeners, listener]

    @property
    def num_in_flight(self) -> int:
        """Requests accepted and not yet finished, whether queued, waiting or running."""
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still running are aborted."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- caller side --------------------------------------------------------------

    def _open(
        self,
        prompt: Prompt,
        params: SamplingParams | None,
        request_id: str | None,
        priority: int,
        cache_salt: str | None,
        truncate_max_tokens: bool = True,
    ) -> StreamState:
        self._check_alive()
        if params is None:
            params = replace(self.engine.default_sampling_params(), output_kind=OutputKind.DELTA)
        loop = asyncio.get_running_loop()
        with self._streams_lock:  # reserve the id first: two callers may race for it
            if request_id is None:
                request_id = self._fresh_id()
            elif not isinstance(request_id, str) or request_id in self._streams:
                raise InvalidRequestError("request_id", request_id, "a string not already in use")
            stream = StreamState(request_id, loop, asyncio.Queue())
            self._streams[request_id] = stream
        try:
            prepared = self.engine.prepare_request(
                request_id, prompt, params, priority, None, cache_salt, truncate_max_tokens
            )
            with self._streams_lock:
                self._check_alive()
                self.engine.check_capacity(len(prepared.children), self._num_pending_adds)
                self._num_pending_adds += len(prepared.children)
                self._commands.append(AddRequest(prepared))
        except BaseException:
            with self._streams_lock:
                del self._streams[request_id]
            raise
        self._wake.set()
        return stream

    def _release(self, stream: StreamState) -> None:
        with self._streams_lock:
            if not stream.finished and not self._closed:
                self._commands.append(AbortRequest(stream.request_id))
                self._wake.set()
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]

    def _command(self, cmd: AbortRequest | ResetPrefixCache | SubscribeKV) -> None:
        with self._streams_lock:
            self._check_alive()
            self._commands.append(cmd)
        self._wake.set()

    def _fresh_id(self) -> str:
        while True:
            rid = f"req-{next(self._ids)}"
            if rid not in self._streams:
                return rid

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop stopped: {self._dead!r}") from self._dead
        if self._stopping or self._closed:
            raise EngineDeadError("the engine is shut down")

    # -- the step loop (its own thread) -----------------------------------------------

    def _build(self, config: EngineConfig | None, engine: Engine | None) -> bool:
        try:
            self.engine = engine if engine is not None else Engine(config)
            self._stats = self.engine.stats()
            return True
        except BaseException as e:  # re-raised in the constructor's thread
            self._build_error = e
            return False
        finally:
            self._built.set()

    def _run(self, config: EngineConfig | None, engine: Engine | None) -> None:
        name_this_thread(ENGINE_THREAD)  # before any kernel: its OpenMP team takes the name too
        if not self._build(config, engine):
            return
        try:
            while not self._stopping:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._stats = self.engine.stats()
                self._notify_step()
                self._deliver(outputs)
                self._publish_kv_events()
            self._close()
            self._abort_all()
        except BaseException as e:  # the loop must never die silently: every stream hears of it
            logger.exception("engine loop failed")
            self._dead = e
            self._close()
            self._fail_all(EngineDeadError(f"the engine loop stopped: {e!r}"))

    def _close(self) -> None:
        """Refuse new commands, then settle the queued ones: no caller may wait forever."""
        with self._streams_lock:
            self._closed = True
            commands, self._commands = list(self._commands), deque()
        for cmd in commands:
            if isinstance(cmd, AbortRequest):
                freed = False
                if self._dead is None:
                    try:
                        freed = self.engine.abort_request(cmd.request_id) is not None
                    except Exception:
                        logger.exception("abort of %s failed while closing", cmd.request_id)
                if cmd.loop is not None and cmd.done is not None:
                    call_soon(cmd.loop, resolve, cmd.done, freed)
            elif isinstance(cmd, SubscribeKV):
                call_soon(cmd.loop, resolve, cmd.done, False)
            # Queued adds never reach the engine; their streams hear EngineDeadError.

    def _apply_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, AddRequest):
                # Under the lock, so a request is always counted, pending or waiting, by
                # the max_waiting_requests check of a concurrent caller.
                with self._streams_lock:
                    try:
                        if cmd.prepared.request_id in self._streams:  # not abandoned on the way
                            self.engine.submit(cmd.prepared)
                    finally:
                        self._num_pending_adds -= len(cmd.prepared.children)
            elif isinstance(cmd, AbortRequest):
                out = self.engine.abort_request(cmd.request_id)
                if out is not None:
                    self._deliver([out])
                if cmd.loop is not None and cmd.done is not None:
                    cmd.loop.call_soon_threadsafe(resolve, cmd.done, out is not None)
            elif isinstance(cmd, SubscribeKV):
                self._publish_kv_events()  # anything pending belongs to the subscribers already there
                cached = CachedBlocks(self.engine.kv_cache.cached_block_hashes())
                snapshot = KVEventBatch(time.time(), [cached])
                cmd.loop.call_soon_threadsafe(cmd.queue.put_nowait, snapshot)
                self._kv_subscribers.append((cmd.loop, cmd.queue))
                cmd.loop.call_soon_threadsafe(resolve, cmd.done, True)
            else:
                self.engine.reset_prefix_cache()
                self._publish_kv_events()
        self._stats = self.engine.stats()

    def _notify_step(self) -> None:
        record = self.engine.last_step
        if record is None:
            return
        for listener in self._listeners:
            try:
                listener.on_step(record, self._stats)
            except Exception:  # a metrics bug must not stop serving
                logger.exception("engine listener failed on a step")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                for listener in self._listeners:
                    try:
                        listener.on_request_finished(out)
                    except Exception:
                        logger.exception("engine listener failed on request %s", out.request_id)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[StreamState, RequestOutput]]] = {}
        with self._streams_lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    stream.finished = True
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            call_soon(loop, put_all, items)

    def _publish_kv_events(self) -> None:
        for batch in self.engine.take_kv_events():
            for loop, queue in list(self._kv_subscribers):
                call_soon(loop, queue.put_nowait, batch)

    def _abort_all(self) -> None:
        with self._streams_lock:
            ids = list(self._streams)
        outputs = [out for rid in ids if (out := self.engine.abort_request(rid)) is not None]
        self._deliver(outputs)
        self._fail_all(EngineDeadError("the engine was shut down"))

    def _fail_all(self, error: BaseException) -> None:
        with self._streams_lock:
            streams = [s for s in self._streams.values() if not s.finished]
        for s in streams:
            call_soon(s.loop, s.queue.put_nowait, error)
