"""tokenmill on one GPU: parity with transformers, then a Llama-3-8B-shaped model against it.

Steps, each under its own time limit and try/except so one failure leaves the
others' results: environment, greedy parity (tiny Llama/Qwen2/Qwen3, bf16 and
fp32), a random checkpoint of the benchmark shape, tokenmill (start-up, batch-1
decode and bandwidth, throughput at several concurrencies), transformers on
the same files, and the ratios. Results go to ``$OUT/results.json`` and
``$OUT/summary.md`` after every step.

    PYTHONPATH=src python benchmarks/gpu/gpu_bench.py                      # the GPU run
    PYTHONPATH=src python benchmarks/gpu/gpu_bench.py --device cpu --shape tiny  # dry run, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_checkpoint import SHAPES, LlamaShape, write_checkpoint
from gpu_engines import Workload, bench_tokenmill, bench_transformers
from gpu_parity import run_parity
from gpu_quant_checks import run_quant_checks
from gpu_report import render_summary

ROOT = Path(__file__).resolve().parents[2]
# Run from a checkout without installing; tests/ holds the tiny-model builders.
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# Per-step limits in seconds (they sum to the default budget).
LIMITS = {
    "environment": 20,
    "parity": 70,
    "checkpoint": 100,
    "tokenmill": 120,
    "transformers": 80,
    "tokenmill-fp8": 110,
    "quant-checkpoints": 40,
}
WORKLOADS = {
    "llama3-8b": Workload(),
    "tiny": Workload(
        decode_tokens=64, concurrency=(8, 32), output_len=32, hf_batch=8, kv_cache_bytes=256 << 20
    ),
}


class StepTimeout(Exception):
    pass


def log(msg: str) -> None:
    print(msg, flush=True)


class Runner:
    """Runs steps under a shared deadline and writes the results after each one."""

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {"meta": meta, "steps": {}}
        self._armed = False
        signal.signal(signal.SIGALRM, self._on_alarm)

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._armed:
            raise StepTimeout

    def ok(self, name: str) -> bool:
        return self.results["steps"].get(name, {}).get("status") == "ok"

    def run(self, name: str, fn: Callable[[Any], None], data: Any, needs: tuple[str, ...] = ()) -> None:
        """Run ``fn(data)``; ``data`` (a dict or list it fills) is recorded even when it fails."""
        remaining = self.deadline - time.monotonic()
        limit = min(LIMITS[name], remaining)
        entry: dict[str, Any] = {"limit_s": round(limit, 1)}
        missing = [n for n in needs if not self.ok(n)]
        if missing:
            entry |= {"status": "skipped", "error": f"needs {', '.join(missing)}"}
        elif limit < 5:
            entry |= {"status": "skipped", "error": "out of time"}
        else:
            log(f"\n== {name} (limit {limit:.0f} s) ==")
            start = time.perf_counter()
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                fn(data)
                entry["status"] = "ok"
            except StepTimeout:
                entry |= {"status": "timeout", "error": f"exceeded {limit:.0f} s"}
            except Exception as e:
                entry |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                entry["traceback"] = traceback.format_exc()
            finally:
                self._armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            entry["data"] = data
            _free_memory()
        if entry["status"] != "ok":
            log(f"  {name}: {entry['status']}: {entry.get('error', '')}")
            if "traceback" in entry:
                log(entry["traceback"])
        else:
            log(f"  {name}: ok in {entry['seconds']} s")
        self.results["steps"][name] = entry
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "summary.md").write_text(render_summary(self.results))


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(env: dict[str, Any], device: torch.device) -> None:
    import tokenizers
    import transformers

    env |= {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "accelerate": _has("accelerate"),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        env |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_total_gib": round(total / 2**30, 1),
            "gpu_free_gib": round(free / 2**30, 1),
            "sm_count": props.multi_processor_count,
        }
    for k, v in env.items():
        log(f"  {k}: {v}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: %(default)s)")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES), help="default: %(default)s")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or ".bench/gpu",
        help="results folder (default: $OUT or %(default)s)",
    )
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps (default: %(default)s)")
    p.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system temp dir)")
    p.add_argument("--peak-bw", type=float, default=4.3e12, help="reference bytes/s (default: %(default)s)")
    p.add_argument(
        "--parity-tokens", type=int, default=48, help="greedy tokens compared (default: %(default)s)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(LIMITS), help="steps to leave out")
    return p.parse_args(argv)


def _quiet_transformers() -> None:
    """No progress bars or generation warnings in the log; errors still show."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass  # the environment step reports it


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds through the finally blocks: scratch folder removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_transformers()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    wall = time.perf_counter()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    shape: LlamaShape = SHAPES[args.shape]
    if args.parity_tokens is None:
        args.parity_tokens = 32 if shape.name == "tiny" else 48
    work = WORKLOADS[args.shape]
    out = Path(args.out)
    meta = {"argv": sys.argv, "shape": shape.__dict__, "workload": work.__dict__, "peak_bw": args.peak_bw}
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runner = Runner(out, args.budget, meta)
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-gpu-bench-", dir=args.tmp))
    log(f"tokenmill GPU bench: device {device}, shape {shape.name}, results in {out}, scratch {tmp}")
    folder = tmp / shape.name
    steps: dict[str, tuple[Callable[[Any], None], Any, tuple[str, ...]]] = {
        "environment": (lambda d: environment(d, device), {}, ()),
        "parity": (lambda d: run_parity(d, tmp / "parity", device, args.parity_tokens, log), [], ()),
        "checkpoint": (lambda d: _write(d, folder, shape, device), {}, ()),
        "tokenmill": (
            lambda d: bench_tokenmill(d, folder, shape, work, device, args.peak_bw, log),
            {},
            ("checkpoint",),
        ),
        "transformers": (
            lambda d: bench_transformers(d, folder, shape, work, device, args.peak_bw, log),
            {},
            ("checkpoint",),
        ),
        # fp8 weights (row-wise scales) and per-token fp8 activations through torch._scaled_mm (Hopper).
        "tokenmill-fp8": (
            lambda d: bench_tokenmill(d, folder, shape, work, device, args.peak_bw, log, quantization="fp8"),
            {},
            ("checkpoint",),
        ),
        # Pre-quantized fp8 folders: saved by tokenmill quantize, and block-wise in DeepSeek's layout.
        "quant-checkpoints": (lambda d: run_quant_checks(d, tmp / "quant", device, log), {}, ()),
    }
    try:
        for name, (fn, data, needs) in steps.items():
            if name not in args.skip:
                runner.run(name, fn, data, needs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runner.results["meta"]["wall_s"] = round(time.perf_counter() - wall, 1)
    runner.write()
    log("\n" + render_summary(runner.results))
    failed = [n for n, s in runner.results["steps"].items() if s["status"] != "ok"]
    return 1 if failed else 0


def _write(info: dict[str, Any], folder: Path, shape: LlamaShape, device: torch.device) -> None:
    from tokenmill.engine.loader import DEMO_MODEL_DIR

    info |= write_checkpoint(folder, shape, device, DEMO_MODEL_DIR)
    log(
        f"  {info['num_params'] / 1e9:.2f} B params, {info['bytes'] / 2**30:.2f} GiB in "
        f"{info['num_shards']} shards, {info['seconds']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
