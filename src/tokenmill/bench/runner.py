"""Drives a load against an OpenAI-compatible server and records what every request saw.

Example, against ``tokenmill bench mock-server`` on 127.0.0.1:8100::

    import asyncio

    from tokenmill.bench.data import RequestSpec
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.runner import LoadRunner, RunSettings

    settings = RunSettings("http://127.0.0.1:8100", LoadProfile("poisson", rate=20.0), max_tokens=32)
    specs = [RequestSpec(prompt=f"question {i}") for i in range(100)]
    records = asyncio.run(LoadRunner(settings).run(specs))

One request per spec, in order. Open-loop profiles send each at its intended
time whatever the server does (a late send shows as schedule lag); the closed
loop keeps ``concurrency`` in flight. A failed request is a record with its
``error_kind``; the run goes on. Setting ``stop`` ends the run early: nothing
more is sent, requests in flight are cancelled and recorded as such.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from tokenmill.bench.data import RequestSpec
from tokenmill.bench.load import LoadProfile, intended_times
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.responses import error_message, fail, read_stream, read_whole, status_kind
from tokenmill.client import (
    ConnectError,
    HTTPTransport,
    ReadTimeout,
    TransportError,
)

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
WORKER_HEADER = "x-tokenmill-worker"


@dataclass(frozen=True)
class RunSettings:
    url: str  # the server's base URL, without /v1
    profile: LoadProfile
    endpoint: str = "chat"  # chat or completions
    model: str | None = None  # None: the first model /v1/models lists
    max_tokens: int = 128  # output tokens asked for when the data gives none
    ignore_eos: bool = True  # ask for exactly max_tokens (servers that support it)
    continuous_usage: bool = False  # ask for usage on every chunk: exact tokens per message
    temperature: float | None = None  # None: the server's default
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_duration: float | None = None  # stop sending after this many seconds
    seed: int = 0
    trace_times: list[float] | None = None  # the trace profile's send times
    think_time: float = 0.0  # multi-turn: seconds between a reply and the next turn
    stream: bool = True  # False: whole responses; TTFT is then the end-to-end latency

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.think_time < 0:
            raise ValueError(f"think_time must be >= 0 s, got {self.think_time}")
        check_url(self.url)


def check_url(url: str) -> None:
    """The transport's own checks of a base URL, now rather than once the run has started."""
    try:
        HTTPTransport(url, max_connections=1)
        port = urlsplit(url).port
    except ValueError as e:  # urlsplit's "Port out of range" does not say which URL
        why = "" if "base_url" in str(e) else f" ({e})"
        raise ValueError(f"URL must look like http://host:port or https://host, got {url!r}{why}") from None
    if port == 0:  # nothing listens on port 0: every request would fail to connect
        raise ValueError(f"URL must look like http://host:port or https://host, got {url!r} (port 0)")


class LoadRunner:
    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.model: str | None = settings.model
        self.started = 0.0  # time.perf_counter() at the run's start: every record time is relative to it
        self.keep_replies = 0  # keep the text of this many successful replies (a re-tokenization check)
        self.replies: dict[int, str] = {}  # record index -> reply text
        self._cards: list[Any] | None = None  # /v1/models' data, once read

    async def resolve_model(self, http: HTTPTransport) -> str:
        """The model to name in requests; asks the server when none was given. Raises
        ``ConnectError`` quickly when the server cannot be reached."""
        if self.model is not None:
            return self.model
        response = await http.request("GET", "/v1/models")
        if response.status != 200:
            fix = "check --api-key" if response.status in (401, 403) else "pass --model"
            message = error_message(response.text)[:200]
            raise ValueError(f"GET /v1/models answered {response.status}: {message}; {fix}")
        models = self._cards = response.json().get("data") or []
        if not models:
            raise ValueError("the server lists no model at /v1/models; pass --model")
        self.model = str(models[0]["id"])
        return self.model

    async def max_model_len(self, http: HTTPTransport) -> int | None:
        """The served model's context as its /v1/models card gives it (tokenmill and vLLM do), or
        None when the server does not say: then nothing is checked against it."""
        cards = self._cards
        if cards is None:  # --model was given: the list was not read for it
            try:
                response = await http.request("GET", "/v1/models")
                cards = response.json().get("data") or [] if response.status == 200 else []
            except (TransportError, ValueError, AttributeError):
                return None
        for card in cards:
            if isinstance(card, dict) and card.get("id") == self.model:
                limit = card.get("max_model_len")
                return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        return None

    async def unreachable(self) -> str | None:
        """None if the server still answers, else why not. On a fresh connection: after a server
        went away, the pool's connections are dead even if it is back."""
        try:
            async with self.transport() as http:
                await http.request("GET", "/v1/models")
        except TransportError as e:
            return f"{type(e).__name__}: {e}"
        return None

    def transport(self, profiles: list[LoadProfile] | None = None) -> HTTPTransport:
        """A connection pool large enough for this run's profile, or for every one of ``profiles``."""
        s = self.settings
        headers = dict(s.headers)
        if s.api_key:
            headers["authorization"] = f"Bearer {s.api_key}"
        connections = max(_connections_for(p) for p in profiles or [s.profile])
        return HTTPTransport(
            s.url,
            headers=headers,
            max_connections=connections,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )

    async def run(
        self,
        specs: list[RequestSpec],
        on_record: Callable[[RequestRecord], None] | None = None,
        stop: asyncio.Event | None = None,
        http: HTTPTransport | None = None,
    ) -> list[RequestRecord]:
        """Send every spec under the profile; the records, in spec order (unsent ones left out)."""
        if self.settings.endpoint == "completions" and any(spec.prompt is None for spec in specs):
            raise ValueError("the completions endpoint needs prompts, not conversations: use --endpoint chat")
        own = http is None
        http = http or self.transport()
        stop = stop or asyncio.Event()
        try:
            await self.resolve_model(http)
            records: list[RequestRecord | None] = [None] * len(specs)

            def done(record: RequestRecord) -> None:
                records[record.index] = record
                if on_record is not None:
                    on_record(record)

            self.started = time.perf_counter()
            if self.settings.profile.open_loop:
                await self._open_loop(http, specs, done, stop)
            else:
                await self._closed_loop(http, specs, done, stop)
            return [r for r in records if r is not None]
        finally:
            if own:
                await http.aclose()

    # -- schedules ------------------------------------------------------------------------

    async def _open_loop(
        self,
        http: HTTPTransport,
        specs: list[RequestSpec],
        done: Callable[[RequestRecord], None],
        stop: asyncio.Event,
    ) -> None:
        """Sessions start at their intended times (a single request is a session of one)."""
        s = self.settings
        sessions = _sessions(specs)
        times = intended_times(s.profile, len(sessions), s.seed, s.trace_times)
        cap = asyncio.Semaphore(s.profile.max_concurrency) if s.profile.max_concurrency else None
        tasks: set[asyncio.Task[None]] = set()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            for k, turns in enumerate(sessions):
                if s.max_duration is not None and times[k] > s.max_duration:
                    break
                delay = self.started + times[k] - time.perf_counter()
                if delay > 0:
                    await asyncio.wait({stopped}, timeout=delay)
                if stop.is_set():
                    break
                task = asyncio.create_task(self._session(http, turns, times[k], done, cap))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await self._finish(tasks, stopped)
        finally:
            stopped.cancel()

    async def _closed_loop(
        self,
        http: HTTPTransport,
        specs: list[RequestSpec],
        done: Callable[[RequestRecord], None],
        stop: asyncio.Event,
    ) -> None:
        """``concurrency`` sessions at a time, a new one as one ends."""
        s = self.settings
        sessions = _sessions(specs)
        pending = iter(sessions)

        async def stream() -> None:
            for turns in pending:  # shared iterator: each session goes to one stream
                if stop.is_set():
                    return
                if s.max_duration is not None and time.perf_counter() - self.started > s.max_duration:
                    return
                await self._session(http, turns, None, done, None)

        n = min(s.profile.concurrency or 1, len(sessions))
        tasks = {asyncio.create_task(stream()) for _ in range(n)}
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await self._finish(tasks, stopped)
        finally:
            stopped.cancel()

    async def _session(
        self,
        http: HTTPTransport,
        turns: list[tuple[int, RequestSpec]],
        intended: float | None,
        done: Callable[[RequestRecord], None],
        cap: asyncio.Semaphore | None,
    ) -> None:
        """The turns of one session in order, each carrying the conversation so far. A turn
        that fails ends its session: what follows it would be a different conversation."""
        history: list[dict[str, Any]] = []
        for k, (i, spec) in enumerate(turns):
            if k > 0:
                wait = self.started + (intended or 0.0) - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
            turn = k if spec.session is not None else None
            record = RequestRecord(i, intended=intended, user=spec.user, turn=turn)
            if spec.session is not None:
                message = {"role": "user", "content": spec.prompt or ""}
                history.append(message)
                if self.settings.endpoint == "chat":
                    spec = replace(spec, messages=list(history))
                else:  # completions: the conversation so far is the prompt, one message a line
                    spec = replace(spec, prompt="\n".join(m["content"] for m in history))
            reply = await self._one(http, spec, record, done, cap)
            if not record.ok:
                return
            if len(self.replies) < self.keep_replies:
                self.replies[record.index] = reply
            history.append({"role": "assistant", "content": reply})
            # The next turn is meant to go out a think time after this reply; in closed
            # loop latencies still count from the actual send.
            next_at = (record.end or self._now()) + self.settings.think_time
            intended = next_at if intended is not None else None
            if intended is None and self.settings.think_time > 0 and k + 1 < len(turns):
                await asyncio.sleep(self.settings.think_time)

    async def _finish(self, tasks: set[asyncio.Task[None]], stopped: asyncio.Future[Any]) -> None:
        """Wait for the requests in flight; if the run is stopped meanwhile, cancel them."""
        while tasks:
            done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
            tasks.difference_update(done)
            if stopped.done():
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return

    # -- one request ------------------------------------------------------------------

    async def _one(
        self,
        http: HTTPTransport,
        spec: RequestSpec,
        record: RequestRecord,
        done: Callable[[RequestRecord], None],
        cap: asyncio.Semaphore | None,
    ) -> str:
        """Send one request, record it, and return the reply's text."""
        try:
            if cap is not None:
                # The wait for a slot is the server's backlog (the cap is full of its requests),
                # not the client running late: it is kept apart from the schedule lag.
                waiting = time.perf_counter() if cap.locked() else None
                async with cap:
                    if waiting is not None:
                        record.queued = time.perf_counter() - waiting
                    reply = await self._exchange(http, spec, record)
            else:
                reply = await self._exchange(http, spec, record)
        except asyncio.CancelledError:
            fail(record, "cancelled", "the run stopped before the response ended", self._now())
            done(record)
            raise
        done(record)
        return reply

    async def _exchange(self, http: HTTPTransport, spec: RequestSpec, record: RequestRecord) -> str:
        s = self.settings
        chat = s.endpoint == "chat"
        body = self._body(spec)
        record.expected_prompt_tokens = spec.prompt_tokens
        record.expected_output_tokens = body["max_tokens"]
        record.sent = self._now()
        try:
            async with http.stream("POST", ENDPOINTS[s.endpoint], json=body) as response:
                record.sent = response.sent - self.started
                record.first_byte = (response.first_byte or response.sent) - self.started
                record.status = response.status
                record.worker = response.headers.get(WORKER_HEADER)
                if response.status != 200:
                    text = (await response.read()).decode("utf-8", errors="replace")
                    fail(record, status_kind(response.status), error_message(text), self._now())
                    return ""
                if not s.stream:
                    return read_whole(await response.read(), record, self.started, chat)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await response.read()
                    fail(record, "not_streamed", "the response is not an event stream", self._now())
                    return ""
                return await read_stream(response, record, self.started, chat, s.continuous_usage)
        except ConnectError as e:
            fail(record, "connect", str(e), self._now())
        except ReadTimeout as e:
            fail(record, "timeout", str(e), self._now())
        except TransportError as e:
            fail(record, "protocol", str(e), self._now())
        return ""

    def _body(self, spec: RequestSpec) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"model": self.model}
        if s.endpoint == "chat":
            body["messages"] = spec.messages or [{"role": "user", "content": spec.prompt or ""}]
        else:
            if spec.prompt is None:
                raise ValueError(
                    "the completions endpoint needs prompts, not conversations: use --endpoint chat"
                )
            body["prompt"] = spec.prompt
        body["max_tokens"] = spec.output_tokens or s.max_tokens
        body["stream"] = s.stream
        if s.stream:
            body["stream_options"] = {"include_usage": True}
            if s.continuous_usage:
                body["stream_options"]["continuous_usage_stats"] = True
        if s.ignore_eos:
            body["ignore_eos"] = True
        if s.temperature is not None:
            body["temperature"] = s.temperature
        return body

    def _now(self) -> float:
        return time.perf_counter() - self.started


def _sessions(specs: list[RequestSpec]) -> list[list[tuple[int, RequestSpec]]]:
    """Specs grouped by session, in order of first appearance; a spec without one stands alone."""
    groups: dict[str, list[tuple[int, RequestSpec]]] = {}
    out: list[list[tuple[int, RequestSpec]]] = []
    for i, spec in enumerate(specs):
        if spec.session is None:
            out.append([(i, spec)])
        elif spec.session in groups:
            groups[spec.session].append((i, spec))
        else:
            groups[spec.session] = [(i, spec)]
            out.append(groups[spec.session])
    return out


def _connections_for(profile: LoadProfile) -> int:
    if not profile.open_loop:
        return profile.concurrency or 1
    return profile.max_concurrency or 100_000  # open loop: as many as the schedule has in flight
