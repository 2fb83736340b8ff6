"""Cache-aware routing (issue 6), small scale: where shared prefixes land and what it does to TTFT.

`--workers` simulated tokenmill workers (`tokenmill serve --runner simulated`:
the real scheduler and prefix cache, step times from the demo CPU profile),
each with a KV pool of `--kv-tokens` tokens, too small to hold every shared
prefix, so where a prefix goes decides whether it is cached. The load:
`--groups` system prompts of `--prefix-tokens` tokens, each request one of them
plus a unique 50-token question, 32 output tokens, Poisson at `--rate`,
`--requests` requests, through each router and policy in turn, on fresh
workers every time (empty caches). Reported: TTFT p50/p99, throughput, the
workers' own prefix-cache hit rate (from their /metrics), and max/mean
requests per worker.

    .venv/bin/python benchmarks/router_cache.py       # ~3 min; peers need benchmarks/peers/setup_routers.sh
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench_process import RESULTS, ROOT, one_run_at_a_time, report_header, save_report
from router_overhead import PEERS, TOKENMILL, _router

DEMO = ROOT / "src" / "tokenmill" / "engine" / "demo_model"
RUNS = (
    ("tokenmill", "round_robin"),
    ("tokenmill", "least_load"),
    ("tokenmill", "prefix"),
    ("vllm-router", "cache_aware"),
    ("sglang-router", "cache_aware"),
)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"router_cache-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    report = report_header("router_cache", stamp, argv, args, DEMO)
    report["results"] = {}
    with one_run_at_a_time():
        for name, policy in RUNS:
            if name != "tokenmill" and not (PEERS / name).exists():
                print(f"[bench] {name}: missing, run benchmarks/peers/setup_routers.sh", flush=True)
                continue
            label = f"{name} {policy}"
            print(f"[bench] {label}", flush=True)
            with _fleet(args, logs / label.replace(" ", "-")) as workers:
                with _router(name, workers, logs, policy, model="demo") as (url, _):
                    result = _load(url, args, logs / label.replace(" ", "-"))
                result["prefix_hit_rate"] = _hit_rate(workers)
                report["results"][label] = result
    out = save_report(report)
    _print_table(report)
    print(f"\nresults: {out}")
    return 0


@contextlib.contextmanager
def _fleet(args: argparse.Namespace, log_prefix: Path) -> Iterator[list[str]]:
    kv_bytes = args.kv_tokens * 2048  # the demo model keeps 2 KiB of KV per token
    procs, urls = [], []
    try:
        for i in range(args.workers):
            cmd = [*TOKENMILL, "serve", "--runner", "simulated", "--port", "0", "--grpc-port", "-1"]
            cmd += ["--kv-cache-memory", str(kv_bytes), "--worker-id", f"sim-{i}"]
            procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True))
        for proc in procs:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "ready: " in line:
                    urls.append(line.split("ready: ")[1].split("/v1")[0])
                    break
            else:
                raise RuntimeError(f"a simulated worker did not start; see {log_prefix}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def _load(url: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [
        *TOKENMILL,
        "bench",
        "run",
        url,
        "--model",
        "demo",
        "--profile",
        "poisson",
        "--rate",
        str(args.rate),
    ]
    cmd += ["--requests", str(args.requests), "--data", "shared-prefix", "--prefix-groups", str(args.groups)]
    cmd += ["--prefix-tokens", str(args.prefix_tokens), "--prompt-tokens", "50", "--output-tokens", "32"]
    cmd += ["--tokenizer", str(DEMO), "--check-tokens", "0", "--max-lag-p99", "1", "-o", str(out)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=900
    )
    summary_file = out.with_name(out.name + ".json")
    if not summary_file.exists():
        raise RuntimeError(f"bench run failed: {done.stderr[-500:]}")
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
        "max_over_mean_requests": max(per_worker) / (sum(per_worker) / len(per_worker))
        if per_worker
        else None,
    }


def _hit_rate(workers: list[str]) -> float | None:
    hits = queries = 0.0
    for url in workers:
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
                if line.startswith("tokenmill_prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("tokenmill_prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits / queries if queries else None


def _print_table(report: dict[str, Any]) -> None:
    o = report["options"]
    print(f"\n## Cache-aware routing, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; `{report['command']}`")
    print(
        f"- {o['workers']} simulated workers, KV {o['kv_tokens']} tokens each; {o['groups']} prefixes of "
        f"{o['prefix_tokens']} tokens + 50, 32 out; Poisson {o['rate']} req/s, {o['requests']} requests\n"
    )
    head = ["router policy", "TTFT ms p50 / p99", "req/s", "output tok/s", "prefix hit rate"]
    print("| " + " | ".join([*head, "max/mean requests", "failed"]) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in report["results"].items():
        hit = f"{r['prefix_hit_rate']:.1%}" if r["prefix_hit_rate"] is not None else "-"
        imb = f"{r['max_over_mean_requests']:.2f}" if r["max_over_mean_requests"] else "-"
        print(
            f"| {label} | {r['ttft_ms']['median']:.1f} / {r['ttft_ms']['p99']:.1f} | {r['req_s']:.1f} | "
            f"{r['output_tok_s']:.0f} | {hit} | {imb} | {r['failed']} |"
        )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cache-aware routing on simulated workers.")
    p.add_argument("--workers", type=int, default=4, help="simulated workers")
    p.add_argument("--kv-tokens", type=int, default=4096, help="KV pool of each worker, in tokens")
    p.add_argument("--groups", type=int, default=12, help="shared system prompts")
    p.add_argument("--prefix-tokens", type=int, default=800, help="tokens of each system prompt")
    p.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals, requests/s")
    p.add_argument("--requests", type=int, default=600, help="requests per run")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
