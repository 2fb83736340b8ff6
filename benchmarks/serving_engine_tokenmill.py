"""tokenmill's ``Engine`` driven step by step (the parent puts ``src/`` on ``PYTHONPATH``)."""

from __future__ import annotations

from typing import Any

from serving_scenarios import Arrival


class TokenmillAdapter:
    name = "tokenmill"
    dists = ("torch",)

    def __init__(self, model: str, options: dict[str, Any]):
        from tokenmill.engine import Engine, EngineConfig, OutputKind, SamplingParams

        self._params = lambda n: SamplingParams(
            max_tokens=n, ignore_eos=True, temperature=0.0, output_kind=OutputKind.CUMULATIVE
        )
        self.engine = Engine(
            EngineConfig(
                model=model,
                dtype="bfloat16",
                max_model_len=2048,
                max_num_seqs=options.get("max_num_seqs", 256),
                max_num_batched_tokens=options.get("max_num_batched_tokens", 2048),
                enable_prefix_caching=options.get("prefix_caching", True),
                scheduling_policy=options.get("policy", "priority"),
                max_itl=options.get("max_itl"),
                timing_profile=options.get("timing_profile"),
            )
        )

    def add(self, arrival: Arrival) -> None:
        self.engine.add_request(
            arrival.rid, arrival.token_ids, self._params(arrival.max_tokens), priority=arrival.priority
        )

    def step(self) -> list[tuple[str, list[int], bool]]:
        return [(o.request_id, o.outputs[0].token_ids, o.finished) for o in self.engine.step()]

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def set_policy(self, policy: str) -> None:
        """Switch the scheduling policy between runs (a benchmark device: both policies then share
        one process, one warm engine and the same moment of a noisy machine)."""
        from dataclasses import replace

        from tokenmill.engine.request_queue import WaitingQueue

        scheduler = self.engine.scheduler
        assert not scheduler.has_unfinished_requests(), "switch policies between runs only"
        scheduler.config = replace(scheduler.config, policy=policy)
        scheduler.waiting = WaitingQueue(use_priority=policy == "priority")

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats()
        return {
            "num_preemptions": s.num_preemptions,
            "prefix_cache_hit_rate": round(s.prefix_cache_hit_rate, 4),
        }
