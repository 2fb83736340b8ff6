"""Continuous batching: which requests run in the next step, and with how many tokens.

Pure Python, no tensors. Each ``schedule()`` fills a token budget
(``max_num_batched_tokens``): running requests first, in the order they
started, each asking for the tokens it has not computed yet (one for a decode,
the rest of its prompt for a prefill, cut to the budget: chunked prefill); then
waiting requests, higher priority first, then by arrival, while the budget,
``max_num_seqs`` and free blocks allow. Requests join and leave at every step.

When a running request needs a block and none is free, the newest running
request is preempted: its blocks go back to the pool and it returns to the
waiting queue under its original arrival, to be recomputed from its prompt and
the tokens it had already generated (recompute is cheaper than swapping on one
device).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import WaitingQueue
from tokenmill.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class StepUpdate:
    """What one step did to one request, for the output processor."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager):
        self.config = config
        self.kv_cache = kv_cache
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # told to the runner in the next output
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish a request wherever it is, freeing its blocks. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish_request(self, request_id: str, reason: str | int) -> None:
        """Stop a request that the output processor found a stop string in."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
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
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = set()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self._allocate_or_preempt(request, num_new, out)
            if new_blocks is None:
                break  # the request itself was preempted, and it was the last one
            out.cached_requests.append(
                CachedRequestData(request.request_id, new_blocks, request.num_computed_tokens)
            )
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
            i += 1

        # After a preemption the pool is tight: admitting new work would only
        # preempt it again next step.
        while (
            not out.preempted_request_ids
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting.peek()
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.kv_cache.allocate_slots(request, num_new)
            if new_blocks is None:
                break
            self.waiting.pop()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.times.first_scheduled is None:
                request.times.first_scheduled = time.perf_counter()
            out.new_requests.append(
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
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> list[int] | None:
        while True:
            new_blocks = self.kv_cache.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self.running.pop()  # the newest; never one already scheduled this step
            self._preempt(victim)
            out.preempted_request_ids.add(victim.request_id)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)  # under its original arrival: ahead of later ones
        logger.info(
            "preempted %s (%d tokens, %d free blocks)",
            request.request_id,
            request.num_tokens,
            self.kv_cache.num_free_blocks,
        )

    # -- results ----------------------------------------------------------

    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[StepUpdate]:
        updates: list[StepUpdate] = []
        now = time.perf_counter()
        for request_id, num_tokens in scheduled.num_scheduled_tokens.items():
            request = self.requests[request_id]
            if request.is_finished:
                continue
            request.num_computed_tokens += num_tokens
            token = result.sampled_token_ids.get(request_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            request.output_token_ids.append(token)
            if request.times.first_token is None:
                request.times.first_token = now
            request.times.last_token = now
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

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.waiting.forget(request.request_id)
        request.status = status
        request.times.finished = time.perf_counter()
        self.kv_cache.free(request.request_id)
        self._finished_ids.add(request.request_id)
        del self.requests[request.request_id]
