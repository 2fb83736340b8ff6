"""The fp8 KV cache (issue 9): capacity, speed and quality against the model-dtype cache, on CPU.

On the 125M benchmark model (random weights: capacity and speed depend on shapes only), bf16:

- capacity: the KV plan at the same ``--kv-cache-memory`` (tokens, and sequences of
  ``--max-model-len`` tokens, that fit);
- throughput: ``--requests`` requests of 128 prompt tokens and ``--max-tokens`` output tokens
  at once (the ``64x128`` workload of workloads.py), output tokens/s; each run in a process of
  its own, auto and fp8 alternated, ``--repeats`` of each, medians reported.

Quality on the trained demo model (random weights have no quality to lose), bf16: perplexity on
the last ``--heldout-chars`` characters of its corpus, in windows of 256 tokens, with each cache.
The windows are scored in chunks of 16 tokens, so every chunk after the first reads its context
back from the cache (the path decode takes); the whole-window figure is printed beside it (the
fp8 backend attends over the dequantized values on both paths, so the two should agree).

    .venv/bin/python benchmarks/kv_cache_fp8.py                 # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench_model import ensure_bench_model
from bench_process import ROOT, one_run_at_a_time, report_header, save_report, wait_until_quiet

KV_DTYPES = ("auto", "fp8")
CHUNK = 16  # tokens per scoring step: as chunked prefill feeds a prompt
WINDOW = 256  # tokens per perplexity window


def measure_speed(model: str, kv_cache_dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """One child process (``--worker MODEL KV speed``): the plan and one timed run of the workload."""
    from tokenmill.engine import LLM, SamplingParams
    from workloads import make_workload

    llm = LLM(
        model,
        dtype="bfloat16",
        device="cpu",
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_memory=args.kv_cache_memory,
        max_model_len=args.max_model_len,
        max_num_seqs=args.requests,
    )
    plan = llm.kv_plan
    out: dict[str, Any] = {
        "kv_cache_dtype": kv_cache_dtype,
        "kv_dtype": plan.kv_dtype,
        "bytes_per_token": plan.bytes_per_block // plan.block_size,
        "kv_tokens": plan.num_tokens,
        "full_length_sequences": plan.max_full_length_sequences,
        "summary": plan.summary(),
    }
    llm.generate(["warm up"] * 4, SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    workload = make_workload("64x128")
    prompts = [{"prompt_token_ids": p} for p in workload.prompts[: args.requests]]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    out["output_tokens"] = sum(len(r.outputs[0].token_ids) for r in results)
    out["throughput_tok_s"] = out["output_tokens"] / seconds
    return out


def measure_quality(kv_cache_dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """One child process (``--worker - KV quality``): demo-model perplexity, chunked and whole."""
    from tokenmill.engine import LLM
    from tokenmill.engine.scoring import perplexity

    demo = LLM(None, dtype="bfloat16", device="cpu", kv_cache_dtype=kv_cache_dtype)
    ids = demo.tokenizer.encode(heldout_text(args.heldout_chars))
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "perplexity_chunked": perplexity(demo.engine, windows, chunk_size=CHUNK),
        "perplexity_whole": perplexity(demo.engine, windows),
        "perplexity_tokens": sum(len(w) for w in windows),
    }


def heldout_text(chars: int) -> str:
    """The end of the last work in the demo model's corpus: inside the 1% its training held out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_demo_model import training_documents

    return training_documents()[-1][-chars:]


def run_child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"[bench] child {args} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_tables(
    speed: dict[str, list[dict[str, Any]]], quality: dict[str, dict[str, Any]], args: argparse.Namespace
) -> None:
    auto, fp8 = speed["auto"][0], speed["fp8"][0]
    print(f"\ncapacity at kv_cache_memory={args.kv_cache_memory} bytes, max_model_len={args.max_model_len}:")
    print("| KV cache | bytes/token | tokens | vs auto | full-length sequences | vs auto |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in (auto, fp8):
        print(
            f"| {row['kv_cache_dtype']} ({row['kv_dtype']}) | {row['bytes_per_token']} "
            f"| {row['kv_tokens']} | {row['kv_tokens'] / auto['kv_tokens']:.2f}x "
            f"| {row['full_length_sequences']} "
            f"| {row['full_length_sequences'] / auto['full_length_sequences']:.2f}x |"
        )
    base = statistics.median(r["throughput_tok_s"] for r in speed["auto"])
    base_ppl = quality["auto"]["perplexity_chunked"]
    print(
        f"\n{args.requests} requests x 128 prompt tokens -> {args.max_tokens} tokens (bf16, CPU); "
        "demo-model perplexity:"
    )
    print(
        "| KV cache | output tok/s, median (runs) | vs auto | demo perplexity, chunks of 16 | vs auto "
        "| whole windows |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kv in KV_DTYPES:
        runs = [r["throughput_tok_s"] for r in speed[kv]]
        q = quality[kv]
        median = statistics.median(runs)
        print(
            f"| {kv} | {median:.1f} ({', '.join(f'{r:.1f}' for r in runs)}) | {median / base:.2f}x "
            f"| {q['perplexity_chunked']:.3f} | {q['perplexity_chunked'] / base_ppl - 1:+.2%} "
            f"| {q['perplexity_whole']:.3f} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests of the throughput run (at most 64)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs of each KV dtype, alternated")
    p.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="KV pool bytes, both dtypes")
    p.add_argument("--max-model-len", type=int, default=2048, help="sequence length of the capacity plan")
    p.add_argument("--heldout-chars", type=int, default=20000, help="characters of held-out text")
    p.add_argument("--wait-quiet", type=float, default=60.0, help="seconds to wait for a quiet CPU per run")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "KV", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        model, kv, what = args.worker
        result = measure_speed(model, kv, args) if what == "speed" else measure_quality(kv, args)
        print(json.dumps(result))
        return 0
    model = ensure_bench_model()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = report_header("kv_cache_fp8", stamp, argv, args, model)
    passed = list(argv if argv is not None else sys.argv[1:])
    speed: dict[str, list[dict[str, Any]]] = {kv: [] for kv in KV_DTYPES}
    quality: dict[str, dict[str, Any]] = {}
    with one_run_at_a_time():
        for i in range(args.repeats):
            for kv in KV_DTYPES:
                other = wait_until_quiet(args.wait_quiet)
                row = run_child([*passed, "--worker", str(model), kv, "speed"])
                row["other_load_cores"] = round(other, 2)
                speed[kv].append(row)
                print(
                    f"[bench] run {i + 1} {kv}: {row['throughput_tok_s']:.1f} tok/s "
                    f"(others {other:.2f} cores)",
                    flush=True,
                )
        for kv in KV_DTYPES:
            quality[kv] = run_child([*passed, "--worker", "-", kv, "quality"])
            print(f"[bench] quality {kv}: perplexity {quality[kv]['perplexity_chunked']:.3f}", flush=True)
    report["speed"], report["quality"] = speed, quality
    print_tables(speed, quality, args)
    print(f"results: {save_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
