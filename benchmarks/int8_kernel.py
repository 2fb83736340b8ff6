"""int8 weight-only matmul (issue 9): tokenmill's kernel against PyTorch's ``_weight_int8pack_mm``.

The 48 linear layers of the 125M benchmark model (12 x qkv 1280x768, o 768x768,
gate_up 4096x768, down 768x2048; 75 MB of int8), random weights, called one after
the other as a decode step does, so every call reads its weight from memory,
not from cache. Per batch size (rows of x): milliseconds per pass over all 48,
the weight bytes per second that makes, and PyTorch's time over ours. Both
kernels take turns ``--turns`` times; medians. Also the dequantize-and-GEMM path
that larger batches take.

    .venv/bin/python benchmarks/int8_kernel.py            # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench_process import one_run_at_a_time

SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)] * 12
PASSES = 10  # back-to-back passes per turn, as decode steps follow one another


def kernel_args(argv: list[str] | None, doc: str, rows: str) -> argparse.Namespace:
    """``--rows`` and ``--turns``, the options of a kernel benchmark."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--rows", default=rows, help="batch sizes (rows of x), comma-separated")
    p.add_argument("--turns", type=int, default=5, help="timed passes of each kernel, taken in turn")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = kernel_args(argv, __doc__, "1,4,16,64,256")
    from tokenmill.engine import native
    from tokenmill.engine.native.int8 import pack_int8_blocks, unpack_int8_blocks
    from tokenmill.engine.quantization import quantize_int8

    gemv = native.int8_gemv()
    if gemv is None:
        print("tokenmill's int8 kernel cannot be built here (see the log line above)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    layers = [quantize_int8(torch.randn(*shape)) for shape in SHAPES]
    blocked = [pack_int8_blocks(q, s) for q, s in layers]
    total = sum(q.numel() for q, _ in layers)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {total / 1e6:.1f} MB of int8 weights")
    print(
        "| rows | tokenmill ms | GB/s | PyTorch int8pack ms | GB/s | PyTorch / tokenmill "
        "| dequantize + GEMM ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with one_run_at_a_time():
        for rows in map(int, args.rows.split(",")):
            xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (768, 2048)}
            t = time_in_turns(_kernels(xs, layers, blocked, gemv, unpack_int8_blocks), args.turns)
            ours, theirs = t["tokenmill"], t["int8pack"]
            print(
                f"| {rows} | {ours:.2f} | {total / ours / 1e6:.1f} | {theirs:.2f} "
                f"| {total / theirs / 1e6:.1f} | **{theirs / ours:.2f}x** | {t['dequantize']:.2f} |"
            )
    return 0


Pair = tuple[torch.Tensor, torch.Tensor]


def _kernels(
    xs: dict[int, torch.Tensor],
    layers: list[Pair],
    blocked: list[Pair],
    gemv: Callable[..., torch.Tensor],
    unpack: Callable[[torch.Tensor, int], torch.Tensor],
) -> dict[str, Callable[[], None]]:
    """One pass over every layer with each kernel, on the activations ``xs`` (by input width)."""

    def tokenmill() -> None:
        for (q, _), (b, s) in zip(layers, blocked, strict=True):
            gemv(xs[q.shape[1]], b, s, q.shape[0])

    def int8pack() -> None:
        for q, s in layers:
            torch._weight_int8pack_mm(xs[q.shape[1]], q, s.to(torch.bfloat16))

    def dequantize() -> None:
        for (q, _), (b, s) in zip(layers, blocked, strict=True):
            n = q.shape[0]
            F.linear(xs[q.shape[1]], unpack(b, n).to(torch.bfloat16) * s[:n].to(torch.bfloat16)[:, None])

    return {"tokenmill": tokenmill, "int8pack": int8pack, "dequantize": dequantize}


def time_in_turns(kernels: dict[str, Callable[[], None]], turns: int) -> dict[str, float]:
    """Milliseconds per pass of each kernel: the median over ``turns`` turns, kernels alternating."""
    for run in kernels.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(turns):
        for name, run in kernels.items():
            run()  # the first pass after another kernel also pays for waking the thread team
            start = time.perf_counter()
            for _ in range(PASSES):
                run()
            times[name].append((time.perf_counter() - start) * 1e3 / PASSES)
    return {name: statistics.median(ms) for name, ms in times.items()}


if __name__ == "__main__":
    sys.exit(main())
