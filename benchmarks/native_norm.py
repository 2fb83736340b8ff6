"""RMSNorm as one native op against its PyTorch form: batch-1 decode on the 125M model, bf16 and int8.

Both forms run in one process, alternating run by run (``--runs`` each, ``--tokens``
tokens after a short prompt, timed by the engine's own token stamps), so the
machine's drift falls on both alike; medians are printed.

    .venv/bin/python benchmarks/native_norm.py      # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import sys

from bench_model import ensure_bench_model
from bench_process import one_run_at_a_time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each form, alternating")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens per run")
    args = p.parse_args(argv)
    from tokenmill.engine import LLM, SamplingParams, native

    native_norm = native.rms_norm
    if native_norm() is None:
        print("tokenmill's CPU kernels cannot be built here (see the log line above)", file=sys.stderr)
        return 1
    model = str(ensure_bench_model())
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    print("| method | PyTorch RMSNorm tok/s | native RMSNorm tok/s | native / PyTorch |")
    print("| --- | ---: | ---: | ---: |")
    with one_run_at_a_time():
        for method in ("bf16", "int8"):
            llm = LLM(
                model, dtype="bfloat16", device="cpu", quantization=None if method == "bf16" else method
            )
            llm.generate(["warm up"], params)
            runs: dict[str, list[float]] = {"pytorch": [], "native": []}
            for _ in range(args.runs):
                for form, lookup in (("pytorch", lambda: None), ("native", native_norm)):
                    native.rms_norm = lookup  # RMSNorm asks for the op at every call
                    times = llm.generate(["To be, or not to be"], params)[0].metrics.token_times
                    runs[form].append((len(times) - 1) / (times[-1] - times[0]))
            native.rms_norm = native_norm
            ours, theirs = statistics.median(runs["native"]), statistics.median(runs["pytorch"])
            print(f"| {method} | {theirs:.1f} | {ours:.1f} | {ours / theirs:.3f}x |")
            del llm
    return 0


if __name__ == "__main__":
    sys.exit(main())
