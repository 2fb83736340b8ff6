"""Cache-aware routing (issue 6): where shared prefixes land and what it does to TTFT, per policy.

`--workers` simulated tokenmill workers (`tokenmill serve --runner simulated`:
the real scheduler, prefix cache and KV events; step times from the demo CPU
profile, about 11k prefill tokens/s) serve the demo tokenizer with 8k
positions. Each holds `--kv-tokens` tokens of KV: a few of the shared prefixes,
not all, so where a prefix goes decides whether it is cached.

The load is multi-tenant chat: `--groups` system prompts of `--prefix-tokens`
tokens (drawn per prompt from the range), each request one of them (drawn at
random) with a unique 50-token user message and 32 output tokens, Poisson
arrivals. The rate is `--load` times the fleet's capacity, measured first in
the same run: the request rate a closed loop of 4 requests per worker gets
through `least_load` (a router that ignores caches). Every router and policy
then gets the same requests on fresh workers (empty caches):
round_robin, least_load, prefix, kv, and vllm-router's and sglang-router's
cache_aware. Reported per run: TTFT p50/p99, throughput, the workers' own
prefix-cache hit rate, and max/mean over workers of requests and of engine
busy time (the compute each worker did). `--repeats` runs the whole set again;
the table gives medians.

    .venv/bin/python benchmarks/router_cache.py       # ~15 min; peers need benchmarks/peers/setup_routers.sh
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench_process import RESULTS, ROOT, one_run_at_a_time, report_header, save_report
from router_overhead import PEERS, TOKENMILL, _router
from sim_fleet import simulated_fleet

DEMO = ROOT / "src" / "tokenmill" / "engine" / "demo_model"
SIM_MODEL = ROOT / ".bench" / "sim-model-8k"
MAX_MODEL_LEN = 8192
RUNS = (
    ("tokenmill", "round_robin"),
    ("tokenmill", "least_load"),
    ("tokenmill", "prefix"),
    ("tokenmill", "kv"),
    ("vllm-router", "cache_aware"),
    ("sglang-router", "cache_aware"),
)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"router_cache-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    model = _sim_model()
    report = report_header("router_cache", stamp, argv, args, model)
    report["results"] = {}
    with one_run_at_a_time():
        if args.rate is None:
            capacity = _capacity(args, model, logs / "capacity")
            report["capacity_req_s"] = capacity
            args.rate = round(args.load * capacity, 2)
            print(f"[bench] fleet capacity {capacity:.1f} req/s; Poisson at {args.rate} req/s", flush=True)
        report["rate"] = args.rate
        for repeat in range(args.repeats):
            for name, policy in RUNS:
                if args.only and f"{name}:{policy}" not in args.only.split(","):
                    continue
                if name != "tokenmill" and not (PEERS / name).exists():
                    print(f"[bench] {name}: missing, run benchmarks/peers/setup_routers.sh", flush=True)
                    continue
                label = f"{name} {policy}"
                print(f"[bench] {label} (repeat {repeat + 1}/{args.repeats})", flush=True)
                out = logs / f"{label.replace(' ', '-')}-{repeat}"
                extra = ("--tokenizer", str(model)) if policy == "kv" else ()
                with _fleet(args, model) as workers:
                    with _router(name, workers, logs, policy, model="demo", extra=extra) as (url, _):
                        before = _worker_counters(workers)
                        result = _load(url, args, out, rate=args.rate)
                    result.update(_worker_figures(workers, before))
                report["results"].setdefault(label, []).append(result)
                _print_run(label, result)
    out_file = save_report(report)
    _print_table(report)
    print(f"\nresults: {out_file}")
    return 0


def _sim_model() -> Path:
    """The demo tokenizer with 8k positions: the simulated runner needs no weights."""
    SIM_MODEL.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(DEMO / name, SIM_MODEL / name)
    config = json.loads((DEMO / "config.json").read_text())
    config["max_position_embeddings"] = MAX_MODEL_LEN
    (SIM_MODEL / "config.json").write_text(json.dumps(config, indent=2))
    return SIM_MODEL


def _fleet(args: argparse.Namespace, model: Path) -> contextlib.AbstractContextManager[list[str]]:
    kv_bytes = args.kv_tokens * 2048  # the demo model keeps 2 KiB of KV per token
    options = [str(model), "--kv-cache-memory", str(kv_bytes), "--kv-events"]
    options += ["--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "demo"]
    return simulated_fleet(args.workers, options)


def _capacity(args: argparse.Namespace, model: Path, out: Path) -> float:
    """Requests/s the fleet sustains with caches ignored: a closed loop through least_load."""
    with _fleet(args, model) as workers, _router("tokenmill", workers, out.parent, "least_load", "demo") as r:
        result = _load(r[0], args, out, concurrency=4 * args.workers, requests=args.requests // 2)
    return result["req_s"]


def _load(
    url: str,
    args: argparse.Namespace,
    out: Path,
    rate: float | None = None,
    concurrency: int | None = None,
    requests: int | None = None,
) -> dict[str, Any]:
    cmd = [*TOKENMILL, "bench", "run", url, "--model", "demo", "--requests", str(requests or args.requests)]
    if rate is not None:
        cmd += ["--profile", "poisson", "--rate", str(rate), "--max-lag-p99", "1"]
    else:
        cmd += ["--concurrency", str(concurrency)]
    cmd += [
        "--data",
        "shared-prefix",
        "--prefix-groups",
        str(args.groups),
        "--prefix-tokens",
        args.prefix_tokens,
    ]
    cmd += ["--prompt-tokens", "50", "--output-tokens", "32", "--tokenizer", str(DEMO), "--check-tokens", "0"]
    cmd += ["--seed", str(args.seed), "-o", str(out)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=1800
    )
    summary_file = out.with_name(out.name + ".json")
    if not summary_file.exists():
        raise RuntimeError(f"bench run failed: {done.stderr[-800:]}")
    s = json.loads(summary_file.read_text())["summary"]
    per_worker = [w["requests"] for w in (s.get("workers") or {}).values()]
    return {
        "requests": s["requests"],
        "failed": s["failed"],
        "errors": s["errors"],
        "output_tok_s": s["output_tok_s"],
        "req_s": s["request_tput"],
        "ttft_ms": {k: s["ttft"][k] * 1000 for k in ("median", "p99")},
        "per_worker_requests": per_worker,
        "max_over_mean_requests": _max_over_mean(per_worker),
    }


_COUNTERS = (
    "tokenmill_prefix_cache_hits_total",
    "tokenmill_prefix_cache_queries_total",
    "tokenmill_engine_busy_seconds_total",
)


def _worker_counters(workers: list[str]) -> dict[str, dict[str, float]]:
    counters: dict[str, dict[str, float]] = {}
    for url in workers:
        found = counters.setdefault(url, dict.fromkeys(_COUNTERS, 0.0))
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                name = line.split("{")[0].split(" ")[0]
                if name in found:
                    found[name] += float(line.rsplit(" ", 1)[1])
    return counters


def _worker_figures(workers: list[str], before: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The run's prefix-cache hit rate over the fleet and max/mean of each worker's busy time."""
    after = _worker_counters(workers)
    delta = {u: {k: after[u][k] - before[u][k] for k in _COUNTERS} for u in workers}
    hits = sum(d["tokenmill_prefix_cache_hits_total"] for d in delta.values())
    queries = sum(d["tokenmill_prefix_cache_queries_total"] for d in delta.values())
    busy = [d["tokenmill_engine_busy_seconds_total"] for d in delta.values()]
    return {
        "prefix_hit_rate": hits / queries if queries else None,
        "busy_s_per_worker": busy,
        "max_over_mean_busy": _max_over_mean(busy),
    }


def _max_over_mean(values: list[float] | list[int]) -> float | None:
    mean = sum(values) / len(values) if values else 0
    return max(values) / mean if mean else None


def _print_run(label: str, r: dict[str, Any]) -> None:
    hit = f"{r['prefix_hit_rate']:.1%}" if r["prefix_hit_rate"] is not None else "-"
    print(
        f"[bench]   TTFT p50 {r['ttft_ms']['median']:.1f} ms, p99 {r['ttft_ms']['p99']:.1f} ms; "
        f"{r['req_s']:.1f} req/s; hit {hit}; max/mean requests {r['max_over_mean_requests'] or 0:.2f}, "
        f"busy {r['max_over_mean_busy'] or 0:.2f}; failed {r['failed']}",
        flush=True,
    )


def _median(runs: list[dict[str, Any]], get: Any) -> float | None:
    values = [v for v in (get(r) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def _print_table(report: dict[str, Any]) -> None:
    o = report["options"]
    print(f"\n## Cache-aware routing, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; `{report['command']}`")
    capacity = report.get("capacity_req_s")
    at = f"{o['load']:.0%} of the measured capacity {capacity:.1f} req/s" if capacity else "as given"
    print(
        f"- {o['workers']} simulated workers, KV {o['kv_tokens']} tokens each; {o['groups']} system "
        f"prompts of {o['prefix_tokens']} tokens + a 50-token user message, 32 out; "
        f"Poisson {report['rate']} req/s ({at}), {o['requests']} requests per run; "
        f"medians of {o['repeats']} repeat(s)\n"
    )
    head = ["router policy", "TTFT ms p50", "TTFT ms p99", "req/s", "output tok/s", "prefix hit rate"]
    print("| " + " | ".join([*head, "max/mean requests", "max/mean busy", "failed"]) + " |")
    print("| --- |" + " ---: |" * 8)
    for label, runs in report["results"].items():
        hit = _median(runs, lambda r: r["prefix_hit_rate"])
        cells = [
            f"{_median(runs, lambda r: r['ttft_ms']['median']):.1f}",
            f"{_median(runs, lambda r: r['ttft_ms']['p99']):.1f}",
            f"{_median(runs, lambda r: r['req_s']):.1f}",
            f"{_median(runs, lambda r: r['output_tok_s']):.0f}",
            f"{hit:.1%}" if hit is not None else "-",
            f"{_median(runs, lambda r: r['max_over_mean_requests']) or 0:.2f}",
            f"{_median(runs, lambda r: r['max_over_mean_busy']) or 0:.2f}",
            str(sum(r["failed"] for r in runs)),
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cache-aware routing on simulated workers.")
    p.add_argument("--workers", type=int, default=8, help="simulated workers")
    p.add_argument("--kv-tokens", type=int, default=16384, help="KV pool of each worker, in tokens")
    p.add_argument("--groups", type=int, default=16, help="shared system prompts")
    p.add_argument("--prefix-tokens", default="1000:4000", help="tokens of each system prompt, N or lo:hi")
    p.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to offer")
    p.add_argument("--rate", type=float, default=None, help="Poisson rate, req/s (skips measuring capacity)")
    p.add_argument("--requests", type=int, default=1200, help="requests per run")
    p.add_argument("--repeats", type=int, default=1, help="times to run the whole set")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload")
    p.add_argument("--only", default="", help="runs to make, e.g. tokenmill:kv,vllm-router:cache_aware")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
