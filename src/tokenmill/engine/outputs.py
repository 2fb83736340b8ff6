"""What the engine returns to callers: one RequestOutput per request and step."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token, with the most likely alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the model's most likely token
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timings of a request in seconds, from time.perf_counter()."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    num_prefill_tokens: int = 0  # tokens computed by prefill (recomputation after preemption included)
    num_decode_tokens: int = 0  # tokens computed one per step
    token_times: list[float] = field(default_factory=list)  # first sample's tokens, when each came out
    priority: int = 0

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive tokens of the first sample, in seconds."""
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def mean_inter_token_latency(self) -> float | None:
        """(last token - first token) / (tokens - 1): TPOT in vLLM, ITL in GuideLLM."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """The state of one request after an engine step.

    ``outputs`` holds one CompletionOutput per sample; with ``OutputKind.DELTA``
    their ``text`` and ``token_ids`` carry only what is new since the last output.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics

    @property
    def text(self) -> str:
        """The first sample's text (most requests have one)."""
        return self.outputs[0].text
