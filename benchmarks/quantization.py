"""Quantization (issue 9): bf16 against int8 and int4 weights on CPU, speed and quality.

int8 runs twice: as its default (the LM head quantized too) and with the head in
bf16 ("int8-bf16-head", as vLLM leaves it), so the head's share shows.

On the 125M benchmark model (random weights: speed depends on shapes only),
each method in a process of its own, the methods taking ``--turns`` turns
(bf16, int8, int4, bf16, ...) so a slow spell of the shared machine falls on
all of them; each figure is the median over turns, each ratio the median of the
per-turn ratios to bf16:

- batch-1 decode tokens/s: one request, ``--decode-tokens`` tokens after a short
  prompt, timed from the first token to the last (the engine's own stamps);
- throughput: ``--requests`` requests of ``--max-tokens`` tokens at once;
- weight memory as the engine reports it (what the KV cache plan subtracts).

Quality on the trained demo model (random weights have no quality to lose):
perplexity on the last ``--heldout-chars`` characters of its corpus (the end of
The Winter's Tale, inside the 1% its training held out; the corpus is cached by
``scripts/corpus.py``) for each method.

    .venv/bin/python benchmarks/quantization.py                 # ~3 min (3 turns)
    .venv/bin/python benchmarks/quantization.py --shape 1b --requests 0   # batch-1 decode on a 1B model
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_model import ensure_bench_model, ensure_bench_model_1b
from bench_process import ROOT, one_run_at_a_time, report_header, save_report

# method -> (quantization, quantize_lm_head). "int8-bf16-head": int8 layers with the LM head left in bf16,
# as vLLM leaves it (int8's default quantizes the head too).
SCHEMES: dict[str, tuple[str | None, bool | None]] = {
    "bf16": (None, None),
    "int8": ("int8", None),
    "int8-bf16-head": ("int8", False),
    "int4": ("int4", None),
    "fp8": ("fp8", None),
}
METHODS = tuple(SCHEMES)
QUALITY_ONLY = ("fp8",)  # CPU runs fp8 on its float32 reference path: its speed says nothing


def measure(model: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in a child process (``--worker``): one engine, every figure for one method."""
    from tokenmill.engine import LLM
    from tokenmill.engine.scoring import perplexity

    quantization, head = SCHEMES[method]
    llm = LLM(
        model,
        dtype="bfloat16",
        device="cpu",
        quantization=quantization,
        quantize_lm_head=head,
        max_num_seqs=max(args.requests, 4),
    )
    engine = llm.engine
    out: dict[str, Any] = {"method": method, "weight_bytes": engine.kv_plan.weight_bytes}
    if method in QUALITY_ONLY:
        out["batch1_decode_tok_s"] = out["throughput_tok_s"] = None
    else:
        out.update(speed(llm, args))
    del llm, engine
    if args.speed_only:
        out["demo_perplexity"] = out["perplexity_tokens"] = None
        return out
    demo = LLM(None, dtype="bfloat16", device="cpu", quantization=quantization, quantize_lm_head=head)
    ids = demo.tokenizer.encode(heldout_text(args.heldout_chars))
    window = 256
    sequences = [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]
    out["demo_perplexity"] = perplexity(demo.engine, sequences)
    out["perplexity_tokens"] = sum(len(s) for s in sequences)
    return out


def speed(llm: Any, args: argparse.Namespace) -> dict[str, float]:
    from tokenmill.engine import SamplingParams

    out = {}
    warm = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    llm.generate(["warm up"] * 4, warm)
    one = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True, temperature=0.0)
    runs = []
    for _ in range(3):
        result = llm.generate(["To be, or not to be"], one)[0]
        times = result.metrics.token_times
        runs.append((len(times) - 1) / (times[-1] - times[0]))
    out["batch1_decode_tok_s"] = sorted(runs)[1]
    if args.requests == 0:
        out["throughput_tok_s"] = None
        return out
    prompts = [f"Question {i}: what news from Verona?" for i in range(args.requests)]
    many = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    results = llm.generate(prompts, many)
    seconds = time.perf_counter() - start
    out["throughput_tok_s"] = sum(len(r.outputs[0].token_ids) for r in results) / seconds
    return out


SPEED_KEYS = ("batch1_decode_tok_s", "throughput_tok_s")


def _median_of_turns(runs: list[dict[str, Any]], base_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first turn's figures (weights, quality), with each speed figure the median over turns and
    its ratio the median of the per-turn ratios to bf16 (each turn against the bf16 run beside it)."""
    out = dict(runs[0])
    for key in SPEED_KEYS:
        values = [r[key] for r in runs if r[key] is not None]
        ratios = [r[key] / b[key] for r, b in zip(runs, base_runs, strict=False) if r[key] and b[key]]
        out[key] = statistics.median(values) if values else None
        out[key + "_turns"] = values
        out[key + "_vs_bf16"] = statistics.median(ratios) if ratios else None
    return out


def heldout_text(chars: int) -> str:
    """The end of the last work in the demo model's corpus: inside the 1% its training held out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_demo_model import training_documents

    return training_documents()[-1][-chars:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens of the batch-1 decode run")
    p.add_argument("--requests", type=int, default=64, help="requests of the throughput run")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request of the throughput run")
    p.add_argument("--heldout-chars", type=int, default=20000, help="characters of held-out text")
    p.add_argument(
        "--shape",
        choices=("125m", "1b"),
        default="125m",
        help="speed model: the 125M benchmark model, or a random Llama-1B (speed figures only)",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=3,
        help="speed runs of every method, taken in turn (bf16, int8, int4, bf16, ...): medians are reported",
    )
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--no-quality", action="store_true", help=argparse.SUPPRESS)  # later turns: speed only
    args = p.parse_args(argv)
    args.speed_only = args.shape != "125m" or args.no_quality
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1], args)))
        return 0
    model = ensure_bench_model() if args.shape == "125m" else ensure_bench_model_1b()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = report_header("quantization", stamp, argv, args, model)
    turns: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    with one_run_at_a_time():
        # Methods take turns, each run a fresh process, so a slow spell of the shared machine
        # falls on all of them rather than on one method's figures.
        for turn in range(args.turns):
            for method in METHODS:
                if turn and method in QUALITY_ONLY:
                    continue
                cmd = [sys.executable, __file__, "--worker", str(model), method, *(argv or sys.argv[1:])]
                done = subprocess.run(
                    cmd + (["--no-quality"] if turn else []), capture_output=True, text=True, check=True
                )
                turns[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"[bench] turn {turn + 1}: {method} done", flush=True)
    report["methods"] = [_median_of_turns(turns[method], turns[METHODS[0]]) for method in METHODS]
    base = report["methods"][0]
    print(
        "| method | weights MiB | batch-1 decode tok/s | vs bf16 | 64 requests tok/s | vs bf16 "
        "| demo perplexity | vs bf16 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in report["methods"]:
        cells = []
        for key in SPEED_KEYS:
            missing = m[key] is None or base[key] is None
            cells += ["-", "-"] if missing else [f"{m[key]:.1f}", f"{m[key + '_vs_bf16']:.2f}x"]
        quality = "- | -"
        if m["demo_perplexity"] is not None:
            change = m["demo_perplexity"] / base["demo_perplexity"] - 1
            quality = f"{m['demo_perplexity']:.3f} | {change:+.2%}"
        print(f"| {m['method']} | {m['weight_bytes'] / 2**20:.0f} | {' | '.join(cells)} | {quality} |")
    print(f"results: {save_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
