"""One endpoint's client for eval: chat calls timed from when they are sent, within a timeout.

Eval puts every question to an endpoint at once, and tokenmill's client holds
most of them in its own queue (its adaptive limit starts at 4 in flight). A
clock started before the call would count that wait, and a question's latency
would depend on where it sat in the queue. So eval takes a slot of the same
size as the client's limit before starting the clock: the client then always
has room (it lets in as many as eval does), and the time measured is the
endpoint's, from sending to the last byte (the client's retries of a 5xx or a
dropped connection included, which are the endpoint's doing too).
"""

from __future__ import annotations

import time
from typing import Any

from tokenmill.client.async_client import AsyncClient
from tokenmill.client.gate import ConcurrencyGate
from tokenmill.client.openai_types import ChatCompletion


class TimedClient:
    def __init__(self, url: str, api_key: str | None, timeout_s: float):
        """``timeout_s``: the most one call may take, from sending to its last byte (retries included)."""
        self.timeout_s = timeout_s
        self._client = AsyncClient(url, api_key=api_key, timeout=timeout_s)
        # Read afresh at every acquire and release, so eval follows the client's limit as it learns.
        self._slots = ConcurrencyGate(lambda: self._client.concurrency_limit)

    async def chat(self, request: dict[str, Any]) -> tuple[ChatCompletion, float]:
        """The reply to a chat request and the seconds it took from sending; a failed call raises
        ``APIError``, ``TransportError`` or ``TimeoutError`` (past ``timeout_s``)."""
        await self._slots.acquire()
        try:
            started = time.perf_counter()
            reply = await self._client.chat.completions.create(**request, timeout=self.timeout_s)
            return reply, time.perf_counter() - started  # type: ignore[return-value]  # not a stream
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        await self._client.aclose()
