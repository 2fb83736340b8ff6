"""Which worker gets a request.

- ``round_robin``: each available worker in turn.
- ``least_load``: fewest tokens in flight (prompt + asked output of requests
  the router has there), scaled by the worker's ramp so a re-admitted worker
  fills up gradually; ties go round the workers. A request that jumps the
  queue (the gateway's higher priority classes, ``RouteRequest.jumps_queue``)
  goes instead where the least prefill is under way: the worker's scheduler
  seats it ahead of everything waiting, so what delays its first token is the
  step running when it arrives, and a step carrying prefills lasts several
  decode steps.
- ``prefix`` and ``kv``: the worker where the request should finish first,
  in seconds: its prefill (prompt tokens already routed there and still
  waiting for their first byte, plus the part of this prompt the worker has
  not cached) at that worker's cost per token, plus one step for the first
  token and one per output token asked, a step costing what the worker's
  batch makes it cost (a fixed part, a part per decoding request and a part
  per token of context they read). Each worker's costs are measured from its
  own /metrics (``router/calibration.py``) and its batch is what the router
  has in flight there. ``prefix`` guesses what a worker has cached from the
  prompts sent there (``router/prefix_index.py``, text chunks, no
  tokenizer); ``kv`` knows it, from the worker's KV events and the prompt's
  exact block hashes (``router/kv_index.py``, ``router/prompt_blocks.py``).
  A cached prefix pulls requests to its worker only while the prefill it
  saves outweighs the slower steps of a fuller batch there; past that the
  prefix is computed again on another worker, which then holds it too, so a
  popular prefix spreads over replicas instead of drowning one worker (no
  "follow the cache unless the imbalance passes a threshold" switch). All
  over the worker's ramp.

Requests of one session (``x-session-id``, ``x-tokenmill-session`` or the body's ``user``) stick to the
worker that served the session before, while it is available and not
overloaded: its in-flight tokens at most ``STICKY_OVERLOAD`` x the least
loaded other worker's, plus the request itself.
"""

from __future__ import annotations

import itertools
import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.router.calibration import DEFAULT_SECONDS_PER_TOKEN, StepCost
from tokenmill.router.kv_index import KVIndex
from tokenmill.router.prefix_index import CHARS_PER_TOKEN, CHUNK_CHARS, PrefixIndex
from tokenmill.router.workers import Worker

if TYPE_CHECKING:  # the tokenizer loads only for the kv policy
    from tokenmill.router.prompt_blocks import PromptBlocks

POLICIES = ("round_robin", "least_load", "prefix", "kv")
STICKY_OVERLOAD = 2.0
MAX_SESSIONS = 100_000  # remembered session -> worker pairs (least recently used go first)


@dataclass(frozen=True)
class RouteRequest:
    tokens: int  # estimated prompt tokens + asked output tokens (every sequence's)
    session: str | None = None
    prompt_tokens: int = 0  # estimated prompt tokens alone (every prompt of a batch)
    prefix: list[int] = field(default_factory=list)  # chained chunk hashes of the prompt (prefix policy)
    blocks: PromptBlocks | None = None  # the prompt's exact KV blocks (kv policy)
    jumps_queue: bool = False  # it outranks requests in flight: workers seat it before those waiting
    sequences: int = 1  # generated side by side: prompts of a batch x (n or best_of)
    choices: int = 1  # sequences per prompt (n or best_of): each reads its prompt's KV every step

    @property
    def output_tokens(self) -> int:
        return self.tokens - self.prompt_tokens


class Router:
    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self._turn = itertools.count()
        self._sessions: OrderedDict[str, str] = OrderedDict()  # session -> worker URL
        self.decisions: dict[str, int] = {}  # reason -> count
        self.prefixes = PrefixIndex()
        self.kv = KVIndex()
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
        elif self.policy in ("prefix", "kv"):
            chosen = self._by_cache(request, workers)
        else:
            start = next(self._turn) % len(workers)
            rotated = workers[start:] + workers[:start]  # ties go round
            if request.jumps_queue:
                chosen = min(
                    rotated,
                    key=lambda w: (
                        w.pending_prefill / w.ramp(),
                        (w.in_flight_tokens + request.tokens) / w.ramp(),
                    ),
                )
                self._count("least_load_jump")
            else:
                chosen = min(rotated, key=lambda w: (w.in_flight_tokens + request.tokens) / w.ramp())
                self._count("least_load")
        if request.session is not None:
            self._remember(request.session, chosen)
        return chosen

    def _by_cache(self, request: RouteRequest, workers: list[Worker]) -> Worker:
        hit = self._cached_tokens(request, workers)
        prompt = request.blocks.num_tokens if request.blocks is not None else request.prompt_tokens
        # The sequences decode side by side: the first token's step, then one per token of each.
        sequences = max(request.sequences, 1)
        steps = 1 + -(-max(request.output_tokens, 0) // sequences)
        context = prompt * max(request.choices, 1) + steps * sequences  # KV its steps read, at the end
        cost_of = self._step_costs(workers)

        def added_latency(w: Worker) -> float:
            """Seconds of latency the request adds there: until its own last token, plus the delay
            its prefill and its KV reads cause the requests already running there."""
            c = cost_of(w)
            uncached = max(prompt - hit(w), 0)
            step = c.per_step + c.per_token * w.in_flight_sequences + c.per_context_token * w.in_flight_tokens
            own = c.per_token * (w.pending_prefill + uncached) + steps * step
            others = w.in_flight * c.per_token * uncached  # each waits out the prefill's chunks
            others += c.per_context_token * context * w.in_flight_output / 2  # about half done
            return (own + others) / w.ramp()

        start = next(self._turn) % len(workers)
        chosen = min(workers[start:] + workers[:start], key=added_latency)  # ties go round
        cached = min(hit(chosen), prompt)
        exact = self.policy == "kv" and request.blocks is not None
        kind = "kv" if exact else ("prefix" if self.policy == "prefix" else "kv_cold")
        self._count(f"{kind}_hit" if cached else f"{kind}_miss")
        self.predicted_hit_tokens += cached
        chosen.predicted_hit_tokens += cached
        self.last_prefill = prompt - cached
        if not exact:
            self.prefixes.record(chosen.url, request.prefix)
        return chosen

    def _cached_tokens(self, request: RouteRequest, workers: list[Worker]) -> Callable[[Worker], int]:
        """Per worker, the prompt tokens it holds in its prefix cache (kv) or probably does (prefix)."""
        if self.policy == "kv" and request.blocks is not None:
            blocks = request.blocks
            matched = self.kv.matched_blocks(blocks.hashes, [w.url for w in workers])
            return lambda w: matched[w.url] * blocks.block_size
        # prefix, and kv for a prompt not tokenized yet (its first sight: see RouterApp) or one the
        # worker will refuse: what was routed where, by text chunks
        chunk_tokens = CHUNK_CHARS // CHARS_PER_TOKEN
        return lambda w: self.prefixes.matched_chunks(w.url, request.prefix) * chunk_tokens

    @staticmethod
    def _step_costs(workers: list[Worker]) -> Callable[[Worker], StepCost]:
        """Each worker's measured step costs; the fleet's medians for workers not measured yet."""
        known = [w.step_cost.cost for w in workers if w.step_cost.cost is not None]
        typical = StepCost(0.0, DEFAULT_SECONDS_PER_TOKEN)
        if known:
            typical = StepCost(
                statistics.median(c.per_step for c in known),
                statistics.median(c.per_token for c in known),
                statistics.median(c.per_context_token for c in known),
            )
        return lambda w: w.step_cost.cost or typical

    def forget(self, url: str) -> None:
        """A worker restarted or left: whatever it had cached is gone."""
        self.prefixes.forget(url)
        self.kv.forget(url)

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
