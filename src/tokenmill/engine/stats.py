"""What the engine reports about itself: its state after a step, and each step's work.

``EngineStats`` is a snapshot with cumulative counters (a metrics exporter reads
it at scrape time); ``StepRecord`` describes one step, for exporters that keep a
histogram per step (tokens against the budget, busy time).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """The engine after its last step."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_cached_blocks: int  # blocks holding a reusable prefix, in use or not
    prefix_cache_queries: int  # prompt tokens looked up since start
    prefix_cache_hits: int  # of which found in the cache
    num_preemptions: int
    num_steps: int
    last_step_seconds: float
    busy_seconds: float = 0.0  # wall time spent in steps since start
    num_prompt_tokens: int = 0  # prompt tokens computed by prefill since start (cache hits excluded)
    num_generated_tokens: int = 0  # tokens sampled since start
    max_num_seqs: int = 0  # the concurrency limit (seats)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass(frozen=True)
class StepRecord:
    """One engine step: how long it took and how much of the token budget it used."""

    seconds: float
    num_scheduled_tokens: int
    token_budget: int  # max_num_batched_tokens
    num_requests: int  # requests in the batch
    num_prompt_tokens: int  # of the scheduled tokens, those that were prefill
    num_generated_tokens: int  # tokens sampled this step
    num_decode_context_tokens: int = 0  # context tokens the step's decodes attended to (KV read)

    @property
    def budget_utilization(self) -> float:
        return self.num_scheduled_tokens / self.token_budget if self.token_budget else 0.0
