"""bf16 decode products on CPU (issue 9's baseline): tokenmill's half_gemv against PyTorch.

The 48 linear layers of the 125M benchmark model in bf16 (151 MB) and its
32000x768 LM head (49 MB), random weights, called one after the other as a
decode step does, so every call reads its weight from memory. Per batch size
(rows of x): milliseconds per pass, the weight bytes per second, and PyTorch's
time over ours. PyTorch's path is the one ``layers.linear`` took before:
``torch.mv`` for one row, ``F.linear`` above; where oneDNN can pack bf16
weights (AVX-512 CPUs) its packed product is timed too, since the engine packs
there and half_gemv is not used. Kernels take turns ``--turns`` times; medians.

    .venv/bin/python benchmarks/half_gemv.py            # ~1 min
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench_process import one_run_at_a_time
from int8_kernel import SHAPES, kernel_args, time_in_turns

LM_HEAD = (32000, 768)


def main(argv: list[str] | None = None) -> int:
    args = kernel_args(argv, __doc__, "1,2,4,16,64")
    from tokenmill.engine import native
    from tokenmill.engine.models.cpu_packing import pack_weight, packed_linear, packing_supported

    gemv = native.half_gemv()
    if gemv is None:
        print("tokenmill's kernels cannot be built here (see the log line above)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    weights = [torch.randn(*shape).to(torch.bfloat16) for shape in [*SHAPES, LM_HEAD]]
    packed = (
        [pack_weight(w) for w in weights] if packing_supported(torch.bfloat16, torch.device("cpu")) else None
    )
    total = sum(w.numel() * w.element_size() for w in weights)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {total / 1e6:.1f} MB of bf16 weights"
    )
    print("| rows | tokenmill ms | GB/s | PyTorch ms | GB/s | PyTorch / tokenmill | oneDNN packed ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with one_run_at_a_time():
        for rows in map(int, args.rows.split(",")):
            xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (768, 2048)}

            t = time_in_turns(_kernels(xs, weights, packed, gemv, packed_linear), args.turns)
            ours, theirs = t["tokenmill"], t["pytorch"]
            onednn = f"{t['onednn']:.2f}" if packed else "- (cannot pack here)"
            print(
                f"| {rows} | {ours:.2f} | {total / ours / 1e6:.1f} | {theirs:.2f} "
                f"| {total / theirs / 1e6:.1f} | **{theirs / ours:.2f}x** | {onednn} |"
            )
    return 0


def _kernels(
    xs: dict[int, torch.Tensor],
    weights: list[torch.Tensor],
    packed: list[torch.Tensor] | None,
    gemv: Callable[..., torch.Tensor],
    packed_linear: Callable[..., torch.Tensor],
) -> dict[str, Callable[[], None]]:
    """One pass over every weight with each kernel, on the activations ``xs`` (by input width)."""

    def tokenmill() -> None:
        for w in weights:
            gemv(xs[w.shape[1]], w)

    def pytorch() -> None:  # layers.linear's path before half_gemv
        for w in weights:
            x = xs[w.shape[1]]
            torch.mv(w, x[0]) if x.shape[0] == 1 else F.linear(x, w)

    def onednn() -> None:
        for w, pw in zip(weights, packed or [], strict=True):
            packed_linear(xs[w.shape[1]], pw, None)

    return {"tokenmill": tokenmill, "pytorch": pytorch, **({"onednn": onednn} if packed else {})}


if __name__ == "__main__":
    sys.exit(main())
