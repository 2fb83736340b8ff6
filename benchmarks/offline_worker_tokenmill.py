"""tokenmill's offline ``LLM`` as an engine, through its public vLLM-like API.

The parent puts ``src/`` on ``PYTHONPATH``, so an uninstalled checkout works;
if ``tokenmill`` (or its ``LLM``) cannot be imported the worker reports the
engine as skipped instead of failing the whole benchmark.
"""

from __future__ import annotations

import argparse
from functools import partial

from offline_harness import Case, CasesFor, Counts, count_outputs, worker_main
from workloads import Workload


def load(args: argparse.Namespace) -> CasesFor:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=str(args.model), dtype="bfloat16", max_model_len=2048, max_num_seqs=args.max_num_seqs)

    def run(workload: Workload) -> Counts:
        params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0) for m in workload.max_tokens]
        return count_outputs(llm.generate(workload.prompts, params), workload)

    setup = f"continuous, max_num_seqs={args.max_num_seqs}"
    return lambda wl: [Case(wl.name, setup, wl, partial(run, wl))]


if __name__ == "__main__":
    worker_main("tokenmill", load, dists=("torch",))
