"""Following every worker's KV events into the router's ``KVIndex`` (the ``kv`` policy).

One task per worker holds ``GET /v1/kv_events`` open: the first event names the
block size and hash scheme, the next is a snapshot of the worker's cache,
then one event per engine step that stored or evicted blocks. If the stream
breaks, what the router knew of that worker is dropped (it may have missed
evictions) and the task reconnects, starting again from a fresh snapshot. A
worker without KV events (a tokenmill worker started with ``--no-kv-events``,
vLLM, SGLang) is said so once in the log and routed by load alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from tokenmill.client import HTTPTransport, TransportError
from tokenmill.engine.block_hash import HASH_SCHEME, ROOT_PARENT_HASH
from tokenmill.router.kv_index import KVIndex
from tokenmill.router.workers import Worker

logger = logging.getLogger(__name__)
RETRY_S = 2.0


class KVSubscriptions:
    def __init__(
        self, index: KVIndex, transport: Callable[[Worker], HTTPTransport], retry_s: float = RETRY_S
    ) -> None:
        self.index = index
        self.transport = transport
        self.retry_s = retry_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._told: set[str] = set()  # workers already reported as having no KV events
        self.connected: set[str] = set()  # workers whose stream is open now

    def sync(self, workers: list[Worker]) -> None:
        """Follow every worker listed; stop following those gone."""
        wanted = {w.url: w for w in workers}
        for url in list(self._tasks):
            if url not in wanted:
                self._tasks.pop(url).cancel()
                self.index.forget(url)
                self.connected.discard(url)
        for url, w in wanted.items():
            if url not in self._tasks or self._tasks[url].done():
                self._tasks[url] = asyncio.create_task(self._follow(w), name=f"kv-events {url}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, w: Worker) -> None:
        while True:
            try:
                await self._stream(w)
            except (TransportError, TimeoutError) as e:
                if w.url in self.connected:
                    logger.warning("KV events of %s broke off (%s); reconnecting", w.url, e)
            except (ValueError, KeyError, TypeError) as e:  # not events this router can read
                if w.url not in self._told:
                    self._told.add(w.url)
                    logger.error("KV events of %s unusable (%s): routing to it by load alone", w.url, e)
            finally:
                self.connected.discard(w.url)
                self.index.forget(w.url)
            await asyncio.sleep(self.retry_s)

    async def _stream(self, w: Worker) -> None:
        async with self.transport(w).stream("GET", "/v1/kv_events") as response:
            if response.status != 200:
                if w.url not in self._told:
                    self._told.add(w.url)
                    logger.warning(
                        "worker %s has no KV events (HTTP %d): the kv policy routes to it by load "
                        "alone (tokenmill workers publish them unless started with --no-kv-events)",
                        w.url,
                        response.status,
                    )
                return
            async for event in response.events():
                if event.data:
                    self._handle(w, json.loads(event.data))

    def _handle(self, w: Worker, message: dict[str, object]) -> None:
        if message.get("type") == "config":
            scheme, root = message.get("hash_scheme"), message.get("root_parent_hash")
            if scheme != HASH_SCHEME or root != ROOT_PARENT_HASH:
                raise ValueError(f"it hashes blocks as {scheme!r}, this router as {HASH_SCHEME!r}")
            self.index.block_sizes[w.url] = int(message["block_size"])  # type: ignore[call-overload]
            self.connected.add(w.url)
            self._told.discard(w.url)
            logger.info("following KV events of %s", w.url)
            return
        events = message.get("events")
        if isinstance(events, list):
            for event in events:
                self.index.apply(w.url, event)
