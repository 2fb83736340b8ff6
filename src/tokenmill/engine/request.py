"""The engine's record of one sequence being generated."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits to be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass
class RequestTimes:
    """Monotonic timestamps (time.perf_counter) of a request's life."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token came out


@dataclass
class Request:
    """One sequence: prompt, generated tokens and how far the KV cache has computed them.

    Invariant: ``num_computed_tokens <= num_tokens``. A request is in prefill while
    ``num_computed_tokens < num_tokens - 1`` would leave prompt tokens unread; once
    every known token but the last is in the KV cache, each step decodes one token.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved against max_model_len at admission
    priority: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    cache_salt: str | None = None  # keeps this tenant's prefix cache apart from others'
    times: RequestTimes = field(default_factory=RequestTimes)
    # Filled by the KV cache manager and scheduler:
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    num_prefill_tokens: int = 0  # tokens computed by prefill, recomputation after preemption included
    num_decode_tokens: int = 0  # tokens computed one per step

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
