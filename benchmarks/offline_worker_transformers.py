"""transformers ``generate`` as an engine: static batches, the baseline to beat.

``generate`` has no scheduler: a batch starts together and ends together, left
padded to its longest prompt and run to its longest output. For equal requests
that costs nothing; for mixed lengths it is the padding and idle-slot waste
that continuous batching removes, so only the tokens each request asked for
are counted as useful output.
"""

from __future__ import annotations

import argparse
from functools import partial

from offline_harness import Case, CasesFor, Counts, worker_main
from workloads import Workload

# The batch sizes each workload runs with; the first gets the workload's own
# name, the others a /bN suffix (PEERS.md quotes 64x128 both ways).
BATCH_SIZES = {"64x128": [64, 16], "batch1": [1], "mixed": [16]}


def load(args: argparse.Namespace) -> CasesFor:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    pad_id = model.generation_config.pad_token_id or 0

    def cases_for(workload: Workload) -> list[Case]:
        sizes = BATCH_SIZES.get(workload.name, [16])
        return [
            Case(
                name=workload.name if i == 0 else f"{workload.name}/b{bs}",
                setup=f"static batches of {bs}, left-padded",
                workload=workload,
                run=partial(_run, model, pad_id, workload, bs),
            )
            for i, bs in enumerate(sizes)
        ]

    return cases_for


def _run(model: object, pad_id: int, workload: Workload, batch_size: int) -> Counts:
    """Run the requests in arrival order, ``batch_size`` at a time."""
    import torch

    useful = computed = 0
    for start in range(0, workload.num_requests, batch_size):
        prompts = workload.prompts[start : start + batch_size]
        asked = workload.max_tokens[start : start + batch_size]
        width, new = max(map(len, prompts)), max(asked)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        # min_new_tokens == max_new_tokens is generate's spelling of ignore_eos.
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad_id,
        )
        generated = out.shape[1] - width
        useful += sum(min(generated, a) for a in asked)
        computed += generated * len(prompts)
    return Counts(useful=useful, computed=computed)


if __name__ == "__main__":
    worker_main("transformers", load, dists=("torch", "transformers"))
