"""A runner without a model: the real scheduler and KV cache, a timing model for the step time.

``SimulatedRunner.execute`` takes the same ``SchedulerOutput`` as the
``ModelRunner`` and returns the same ``ModelRunnerOutput``, so everything above
it (scheduler, prefix cache, priorities, the async engine, a server, a router)
behaves as with a model, while the machine only pays for Python. Each step
lasts what the ``TimingModel`` predicts for its shape, spent on the engine's
clock (really sleeping, or advancing a virtual clock).

Sampled tokens are pseudo-tokens: a hash of the request's tokens so far, so
they are deterministic (the same prompt gives the same text on every worker,
which keeps prefix caching meaningful) and never an end-of-sequence token
(requests run to ``max_tokens``, as benchmarks want). Logprobs are not
simulated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tokenmill.engine.clock import Clock
from tokenmill.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.engine.timing import StepShape, TimingModel

# Pseudo-tokens stay clear of the low ids where tokenizers keep special tokens.
_FIRST_ORDINARY_TOKEN = 16


@dataclass
class _SimState:
    token_ids: list[int]
    eos_token_ids: frozenset[int]
    num_computed_tokens: int


class SimulatedRunner:
    def __init__(self, timing: TimingModel, clock: Clock, vocab_size: int):
        self.timing = timing
        self.clock = clock
        self.vocab_size = vocab_size
        self.states: dict[str, _SimState] = {}
        self.busy_seconds = 0.0

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.states.pop(rid, None)
        for new in sched.new_requests:
            self.states[new.request_id] = _SimState(
                list(new.token_ids), new.eos_token_ids, new.num_computed_tokens
            )
        for cached in sched.cached_requests:
            self.states[cached.request_id].num_computed_tokens = cached.num_computed_tokens
        result = ModelRunnerOutput()
        if sched.is_empty:
            return result
        seconds = self.timing.step_time(StepShape.of(sched))
        self.clock.sleep(seconds)
        self.busy_seconds += seconds
        for rid, n in sched.num_scheduled_tokens.items():
            state = self.states[rid]
            state.num_computed_tokens += n
            if state.num_computed_tokens == len(state.token_ids):
                token = self._pseudo_token(state)
                state.token_ids.append(token)
                result.sampled_token_ids[rid] = token
        return result

    def _pseudo_token(self, state: _SimState) -> int:
        tail = ",".join(map(str, state.token_ids[-8:])) + f"|{len(state.token_ids)}"
        h = int.from_bytes(hashlib.blake2b(tail.encode(), digest_size=8).digest(), "big")
        span = max(1, self.vocab_size - _FIRST_ORDINARY_TOKEN)
        token = _FIRST_ORDINARY_TOKEN + h % span
        while token in state.eos_token_ids:
            token = _FIRST_ORDINARY_TOKEN + (token + 1 - _FIRST_ORDINARY_TOKEN) % span
        return token
