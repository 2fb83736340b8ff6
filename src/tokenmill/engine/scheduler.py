"""Continuous batching: which requests run in the next step, and with how many tokens.

Pure Python, no tensors. Each ``schedule()`` fills a token budget
(``max_num_batched_tokens``) in three passes:

1. running decodes, one token each, so a long prompt never stalls them;
2. running prefills, the rest of their prompt cut to what is left of the
   budget (chunked prefill). With ``max_itl`` set, a ``ChunkSizer`` shrinks
   the prefill share further so the step stays within the decodes'
   inter-token latency target;
3. waiting requests, higher priority first, then by arrival, starting from the
   longest prefix found in the prefix cache, while the budget,
   ``max_num_seqs`` and the free blocks (minus a watermark) allow.

When a running request needs a block and none is free, or when a waiting
request outranks running ones and there is no room for it, a victim chosen by
the preemption policy (``preemption.py``) is preempted: its blocks go back to
the pool (its full blocks stay in the prefix cache, so the recompute is often
cheap) and it returns to the waiting queue under its original arrival.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from tokenmill.engine.clock import Clock, RealClock
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.preemption import pick_victim
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import WaitingQueue
from tokenmill.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from tokenmill.engine.timing import ChunkSizer, StepShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "priority"  # priority | fcfs (preemption.py)
    preemption_priority_gap: int = 1  # a waiting request preempts only those this much below it
    watermark: float = 0.01  # fraction of blocks admission leaves free for running requests to grow


@dataclass(frozen=True)
class StepUpdate:
    """What one step did to one request, for the output processor."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class _Step:
    """The output being built: the budget left, the shape of the work so far, who was preempted."""

    def __init__(self, out: SchedulerOutput, budget: int, track_shape: bool):
        self.out = out
        self.budget = budget
        self.track_shape = track_shape  # only max_itl needs it: spare the step loop otherwise
        self.admitted: set[str] = set()
        self.max_victim_priority: int | None = None
        self._shapes: dict[str, StepShape] = {}  # each scheduled request's share of the step
        self.shape = StepShape()

    def add(self, request: Request, num_tokens: int, start: int) -> None:
        """Schedule ``num_tokens`` of ``request`` from position ``start``."""
        self.out.num_scheduled_tokens[request.request_id] = num_tokens
        self.budget -= num_tokens
        if self.track_shape:
            share = StepShape.of_request(num_tokens, start)
            self._shapes[request.request_id] = share
            self.shape = self.shape + share

    def unschedule(self, request: Request) -> None:
        rid = request.request_id
        self.budget += self.out.num_scheduled_tokens.pop(rid, 0)
        self.out.cached_requests = [c for c in self.out.cached_requests if c.request_id != rid]
        share = self._shapes.pop(rid, None)
        if share is not None:
            self.shape = self.shape - share

    def preempted(self, request: Request) -> None:
        self.out.preempted_request_ids.add(request.request_id)
        p = request.priority
        self.max_victim_priority = p if self.max_victim_priority is None else max(p, self.max_victim_priority)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        chunk_sizer: ChunkSizer | None = None,
        clock: Clock | None = None,
    ):
        self.config = config
        self.kv_cache = kv_cache
        self.chunk_sizer = chunk_sizer
        self.clock = clock or RealClock()
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(use_priority=config.policy == "priority")
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # told to the runner in the next output
        self.num_preemptions = 0
        self._watermark_blocks = math.ceil(config.watermark * kv_cache.num_usable_blocks)

    # -- queue management -------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request wherever it is, freeing its blocks. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        self._remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish_request(self, request_id: str, reason: str | int) -> None:
        """Stop a request that the output processor found a stop string in."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return
        self._remove(request)
        request.stop_reason = reason
        self._finish(request, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step ---------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(
            SchedulerOutput(finished_request_ids=self._finished_ids),
            self.config.max_num_batched_tokens,
            track_shape=self.chunk_sizer is not None,
        )
        self._finished_ids = set()

        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        prefills = [r for r in self.running if r.num_tokens - r.num_computed_tokens > 1]
        for request in decodes:
            if step.budget <= 0:
                break
            if request.status == RequestStatus.RUNNING:  # not preempted earlier in this pass
                self._schedule_running(request, 1, step)

        for request in prefills:
            if step.budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue
            n = min(
                request.num_tokens - request.num_computed_tokens,
                self._chunk_limit(step, request.num_computed_tokens),
            )
            if n <= 0:
                break
            self._schedule_running(request, n, step)

        self._admit_waiting(step)

        # Register the full blocks the running requests compute in this step. (Admitted
        # requests registered theirs on admission, so later admissions could hit them.)
        for request in self.running:
            n = step.out.num_scheduled_tokens.get(request.request_id)
            if n is not None and request.request_id not in step.admitted:
                self.kv_cache.cache_blocks(request, request.num_computed_tokens + n)
        return step.out

    def _chunk_limit(self, step: _Step, start: int) -> int:
        """Tokens a prefill starting at ``start`` may take: the budget left, cut by max_itl."""
        if self.chunk_sizer is None:
            return step.budget
        return self.chunk_sizer.max_chunk(step.shape, start, step.budget)

    def _schedule_running(self, request: Request, num_new: int, step: _Step) -> bool:
        """Allocate for a running request, preempting victims as needed. False if it was preempted itself."""
        while True:
            new_blocks = self.kv_cache.allocate_slots(request, num_new)
            if new_blocks is not None:
                break
            victim = pick_victim(self.running, self.config.policy, self.waiting.arrival)
            assert victim is not None  # the request itself is running
            self._preempt(victim, step)
            if victim is request:
                return False
        step.out.cached_requests.append(
            CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens)
        )
        step.add(request, num_new, request.num_computed_tokens)
        return True

    def _admit_waiting(self, step: _Step) -> None:
        while self.waiting and step.budget > 0:
            request = self.waiting.peek()
            if step.max_victim_priority is not None and (
                self.config.policy == "fcfs" or request.priority <= step.max_victim_priority
            ):
                break  # the pool is tight: admitting more would only preempt it again next step
            first_admission = request.num_cached_tokens < 0
            hits = self.kv_cache.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            num_hit = len(hits) * self.kv_cache.block_size
            start = request.num_computed_tokens + num_hit
            n = min(request.num_tokens - start, self._chunk_limit(step, start))
            if n <= 0 or not self._make_room(request, n, hits, step):
                break
            new_blocks = self.kv_cache.allocate_slots(request, n, hits)
            assert new_blocks is not None  # _make_room checked
            self.waiting.pop()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens += num_hit
            if first_admission:
                request.num_cached_tokens = num_hit
                self.kv_cache.record_prefix_query(request.num_prompt_tokens, num_hit)
            if request.times.first_scheduled is None:
                request.times.first_scheduled = self.clock.now()
            step.out.new_requests.append(
                NewRequestData(
                    request_id=request.request_id,
                    token_ids=request.all_token_ids,
                    num_prompt_tokens=request.num_prompt_tokens,
                    sampling_params=request.sampling_params,
                    block_ids=list(self.kv_cache.block_table(request.request_id)),
                    num_computed_tokens=request.num_computed_tokens,
                    eos_token_ids=request.eos_token_ids,
                )
            )
            step.admitted.add(request.request_id)
            step.add(request, n, start)
            self.kv_cache.cache_blocks(request, request.num_computed_tokens + n)

    def _make_room(self, request: Request, n: int, hits: list[int], step: _Step) -> bool:
        """Whether ``request`` fits (a sequence slot, its blocks and the watermark), preempting
        running requests it outranks by the priority gap if that makes it fit."""

        def fits() -> bool:
            seat = len(self.running) < self.config.max_num_seqs
            # The watermark is room for running requests to grow: with none running, it would
            # only keep a request that needs the whole pool out forever.
            reserve = self._watermark_blocks if self.running else 0
            return seat and self.kv_cache.can_allocate(request, n, hits) >= reserve

        if fits():
            return True
        if self.config.policy == "fcfs":
            return False
        ceiling = request.priority - self.config.preemption_priority_gap
        candidates = [r for r in self.running if r.priority <= ceiling and r.request_id not in step.admitted]
        if not candidates or not self._would_fit_without(request, n, hits, candidates):
            return False
        while not fits():
            victim = pick_victim(candidates, self.config.policy, self.waiting.arrival)
            if victim is None:
                return False
            candidates.remove(victim)
            self._preempt(victim, step)
        return True

    def _would_fit_without(self, request: Request, n: int, hits: list[int], victims: list[Request]) -> bool:
        """Whether preempting all of ``victims`` would make room: so nobody is preempted in vain."""
        if len(self.running) - len(victims) >= self.config.max_num_seqs:
            return False
        pool = self.kv_cache.pool
        released: dict[int, int] = {}
        for v in victims:
            for b in self.kv_cache.block_table(v.request_id):
                released[b] = released.get(b, 0) + 1
        freed = sum(1 for b, k in released.items() if pool.ref_cnt[b] == k)
        needed = self.kv_cache.blocks_for_tokens(len(hits) * self.kv_cache.block_size + n) - len(hits)
        revived = sum(1 for b in hits if pool.ref_cnt[b] == released.get(b, 0))
        reserve = self._watermark_blocks if len(self.running) > len(victims) else 0
        return pool.num_free + freed - needed - revived >= reserve

    def _preempt(self, request: Request, step: _Step) -> None:
        self.running.remove(request)
        step.unschedule(request)
        step.preempted(request)
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)  # under its original arrival: ahead of later ones
        logger.info(
            "preempted %s (priority %d, %d tokens; %d free blocks, %d running)",
            request.request_id,
            request.priority,
            request.num_tokens,
            self.kv_cache.num_free_blocks,
            len(self.running),
        )

    # -- results ----------------------------------------------------------

    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[StepUpdate]:
        updates: list[StepUpdate] = []
        now = self.clock.now()
        for request_id, num_tokens in scheduled.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if num_tokens > 1 or request.num_computed_tokens < request.num_prompt_tokens:
                request.num_prefill_tokens += num_tokens
            else:
                request.num_decode_tokens += 1
            request.num_computed_tokens += num_tokens
            token = result.sampled_token_ids.get(request_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            request.output_token_ids.append(token)
            if request.times.first_token is None:
                request.times.first_token = now
            request.times.last_token = now
            request.times.token_times.append(now)
            status = self._stop_status(request, token)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            updates.append(StepUpdate(request, [token], status is not None))
        return updates

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        past_min = request.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _remove(self, request: Request) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.waiting.forget(request.request_id)
        request.status = status
        request.times.finished = self.clock.now()
        self.kv_cache.free(request.request_id)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]
