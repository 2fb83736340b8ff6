"""Which worker gets a request.

- ``round_robin``: each available worker in turn.
- ``least_load``: fewest tokens in flight (prompt + asked output of requests
  the router has there), scaled by the worker's ramp so a re-admitted worker
  fills up gradually; ties go round the workers.
- ``prefix``: the least estimated time to first token, in tokens of prefill
  ahead of the request (every worker is taken to prefill at the same rate):
  prompt tokens already routed to the worker and still waiting for their
  first byte, plus the part of this prompt it has probably not cached
  (``router/prefix_index.py``), plus ``DECODE_WEIGHT`` tokens for each request
  decoding there; scaled by the ramp. A cached prefix pulls requests to its
  worker only as long as the prefill it saves outweighs the queue it builds
  there, so a popular prefix spreads instead of drowning one worker (no
  "follow the cache unless the imbalance passes a threshold" switch).

Requests of one session (``x-session-id`` or the body's ``user``) stick to the
worker that served the session before, while it is available and not
overloaded: its in-flight tokens at most ``STICKY_OVERLOAD`` x the least
loaded other worker's, plus the request itself.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

from tokenmill.router.prefix_index import CHARS_PER_TOKEN, CHUNK_CHARS, PrefixIndex
from tokenmill.router.workers import Worker

POLICIES = ("round_robin", "least_load", "prefix")
DECODE_WEIGHT = 16  # prefill tokens' worth of delay one running decode adds to a new request's first token
STICKY_OVERLOAD = 2.0
MAX_SESSIONS = 100_000  # remembered session -> worker pairs (least recently used go first)


@dataclass(frozen=True)
class RouteRequest:
    tokens: int  # estimated prompt tokens + asked output tokens
    session: str | None = None
    prompt_tokens: int = 0  # estimated prompt tokens alone
    prefix: list[int] = field(default_factory=list)  # chained chunk hashes of the prompt (prefix policy)


class Router:
    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._turn = itertools.count()
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session -> worker URL
        self.decisions: dict[str, int] = {}  # reason -> count
        self.prefixes = PrefixIndex()
        self.predicted_hit_tokens = 0  # prompt tokens the prefix policy expected cached where it sent them
        self.last_prefill = 0  # prompt tokens the last choice expects its worker to prefill

    def choose(self, request: RouteRequest, workers: list[Worker]) -> Worker | None:
        """The worker for ``request`` among the available ``workers``; None if there is none."""
        if not workers:
            return None
        self.last_prefill = request.prompt_tokens
        if request.session is not None:
            sticky = self._sticky(request, workers)
            if sticky is not None:
                self._count("session")
                return sticky
        if self.policy == "round_robin":
            chosen = workers[next(self._turn) % len(workers)]
            self._count("round_robin")
        elif self.policy == "prefix":
            chosen = self._by_prefix(request, workers)
        else:
            start = next(self._turn) % len(workers)
            rotated = workers[start:] + workers[:start]  # ties go round
            chosen = min(rotated, key=lambda w: (w.in_flight_tokens + request.tokens) / w.ramp())
            self._count("least_load")
        if request.session is not None:
            self._remember(request.session, chosen)
        return chosen

    def _by_prefix(self, request: RouteRequest, workers: list[Worker]) -> Worker:
        start = next(self._turn) % len(workers)
        chunk_tokens = CHUNK_CHARS // CHARS_PER_TOKEN

        def uncached(w: Worker) -> int:
            hit = self.prefixes.matched_chunks(w.url, request.prefix) * chunk_tokens
            return max(request.prompt_tokens - hit, 0)

        def cost(w: Worker) -> float:
            return (w.pending_prefill + uncached(w) + DECODE_WEIGHT * w.in_flight) / w.ramp()

        rotated = workers[start:] + workers[:start]
        chosen = min(rotated, key=cost)
        prefill = uncached(chosen)
        hit = request.prompt_tokens - prefill
        self._count("prefix_hit" if hit else "prefix_miss")
        self.predicted_hit_tokens += hit
        self.last_prefill = prefill
        self.prefixes.record(chosen.url, request.prefix)
        return chosen

    def _sticky(self, request: RouteRequest, workers: list[Worker]) -> Worker | None:
        assert request.session is not None
        url = self._sessions.get(request.session)
        w = next((x for x in workers if x.url == url), None) if url is not None else None
        if w is None:
            return None
        others = [x.in_flight_tokens for x in workers if x is not w]
        if others and w.in_flight_tokens > STICKY_OVERLOAD * min(others) + request.tokens:
            self._count("session_overloaded")
            return None
        self._sessions.move_to_end(request.session)
        return w

    def _remember(self, session: str, w: Worker) -> None:
        self._sessions[session] = w.url
        self._sessions.move_to_end(session)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def _count(self, reason: str) -> None:
        self.decisions[reason] = self.decisions.get(reason, 0) + 1
