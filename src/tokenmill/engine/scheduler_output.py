"""The dataclasses that cross from the scheduler to a runner and back.

The scheduler sends each request's full state once (``NewRequestData``: when it
is first scheduled or resumed after a preemption) and afterwards only what
changed (``CachedRequestData``), so a runner in another process would need
nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.outputs import TokenLogprob
from tokenmill.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    request_id: str
    token_ids: list[int]  # prompt followed by any tokens generated before a preemption
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class CachedRequestData:
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    finished_request_ids: set[str] = field(default_factory=set)  # runner drops their state
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


@dataclass
class ModelRunnerOutput:
    """Sampled tokens of the requests whose scheduled tokens reached the end of
    what they know; partial prefill chunks sample nothing."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
