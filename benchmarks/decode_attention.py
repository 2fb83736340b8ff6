"""Decode attention on CPU: the ``cpu`` backend (tokenmill's paged decode kernel) against the
``reference`` backend (PyTorch: gather the context out of its blocks, then SDPA).

One layer of the 125M benchmark model (12 query heads, 4 KV heads, head size
64, blocks of 16) in bf16, a decode step of ``batch`` sequences that each have
``context`` tokens in the paged cache, their blocks scattered over the pool as
a running server leaves them. Each backend stores the step's K/V and attends,
through its own ``prepare`` and ``forward``, as a model layer calls them; the
two take turns ``--turns`` times. Microseconds per layer (a decode step runs
12), and PyTorch's time over ours.

    .venv/bin/python benchmarks/decode_attention.py          # ~1 min
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from bench_process import one_run_at_a_time
from int8_kernel import time_in_turns
from tokenmill.engine.attention.backend import AttentionBackend, AttentionBatch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 12, 4, 64, 16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes", default="1x128,1x512,1x2048,16x256,64x128,64x512", help="BATCHxCONTEXT, comma-separated"
    )
    p.add_argument("--turns", type=int, default=20, help="timed passes of each backend, taken in turn")
    args = p.parse_args(argv)
    from tokenmill.engine.attention import CpuBackend, ReferenceBackend
    from tokenmill.engine.attention.backend import AttentionSpec

    spec = AttentionSpec(HEADS, KV_HEADS, HEAD_DIM, BLOCK, torch.bfloat16, torch.device("cpu"))
    reason = CpuBackend.unavailable_reason(spec)
    if reason is not None:
        print(f"the cpu backend cannot run here: {reason}", file=sys.stderr)
        return 1
    backends = {"tokenmill": CpuBackend(spec), "pytorch": ReferenceBackend(spec)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16")
    print("| batch | context | tokenmill us | PyTorch (gather + SDPA) us | PyTorch / tokenmill |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with one_run_at_a_time():
        for shape in args.shapes.split(","):
            batch, context = map(int, shape.split("x"))
            runs = _decode_step(backends, batch, context)
            t = time_in_turns(runs, args.turns)
            ours, theirs = t["tokenmill"] * 1e3, t["pytorch"] * 1e3
            print(f"| {batch} | {context} | {ours:.1f} | {theirs:.1f} | **{theirs / ours:.2f}x** |")
    return 0


Layer = Callable[[], None]


def _decode_step(backends: dict[str, AttentionBackend], batch: int, context: int) -> dict[str, Layer]:
    """One layer's decode attention for each backend, over one shared cache of scattered blocks."""
    torch.manual_seed(0)
    per_seq = -(-(context + 1) // BLOCK)
    num_blocks = 1 + batch * per_seq
    (cache,) = backends["pytorch"].allocate_kv_cache(1, num_blocks)
    cache.copy_(torch.randn(cache.shape).to(cache.dtype))
    tables = (1 + torch.randperm(num_blocks - 1)).view(batch, per_seq)
    seq_lens = [context + 1] * batch
    last = torch.tensor(seq_lens) - 1
    slots = tables[torch.arange(batch), last // BLOCK] * BLOCK + last % BLOCK
    step = AttentionBatch(
        num_decodes=batch,
        query_start_loc=list(range(batch + 1)),
        context_lens=[context] * batch,
        seq_lens=seq_lens,
        block_table=tables,
        slot_mapping=slots,
    )
    q = torch.randn(batch, HEADS, HEAD_DIM).bfloat16()
    k = torch.randn(batch, KV_HEADS, HEAD_DIM).bfloat16()
    v = torch.randn(batch, KV_HEADS, HEAD_DIM).bfloat16()

    def run(backend: AttentionBackend) -> Layer:
        meta = backend.prepare(step)  # once a step for every layer: not timed

        def layer() -> None:
            backend.forward(q, k, v, cache, meta)

        return layer

    return {name: run(backend) for name, backend in backends.items()}


if __name__ == "__main__":
    sys.exit(main())
