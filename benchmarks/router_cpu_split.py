"""Where the CPU of a routed request goes on shared cores (issue 7's bound): router, workers, load generator.

`router_overhead.py` gives each router's added latency and its own CPU per
request. On two shared cores, with whole responses at concurrency 32, the
added latency follows from everyone's CPU, not the router's alone: the loop is
closed, so latency = 32 / requests per second, and requests per second =
busy cores / CPU per request summed over every process. This benchmark
measures each term in steady state: the same two instant workers and the same
load as `router_overhead.py` (`tokenmill bench run`, 16 tokens in, 8 out),
and, over a window that starts once the load is flowing (the load generator
first prepares its requests, alone), the CPU of the router, of each worker and
of the load generator per request, the host's busy share, and the router's
share of one core (at 1.0 a single-threaded router is the bottleneck).

Per turn it also prints each router's added latency over vllm-router's, as
`router_overhead.py` does: the ratio the bound is about, beside the CPU that
makes it.

Routers take turns (`--turns`), as in `router_overhead.py`; medians over turns.
Results: `.bench/results/router_cpu_split-<timestamp>.json`.

    benchmarks/peers/setup_routers.sh                  # vllm-router into .peers/routers
    .venv/bin/python benchmarks/router_cpu_split.py    # ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import router_overhead as ro
from bench_model import ensure_bench_model
from bench_process import RESULTS, one_run_at_a_time, report_header, save_report

CONCURRENCY = 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--requests", type=int, default=60_000, help="per load; enough to outlast the window")
    p.add_argument("--window-s", type=float, default=6.0, help="the steady-state window measured")
    p.add_argument("--routers", default="direct,tokenmill,tokenmill-gateway,vllm-router")
    args = p.parse_args(argv)
    model = ensure_bench_model()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"router_cpu_split-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    report = report_header("router_cpu_split", stamp, argv, args, model)
    report["turns"] = []
    with one_run_at_a_time(), ro._workers(2, logs) as urls:
        worker_pids = _pids_of(urls)
        for turn in range(args.turns):
            results: dict[str, dict[str, Any]] = {}
            for name in args.routers.split(","):
                if not ro._installed(name):
                    print(f"[bench] {name}: missing, run benchmarks/peers/setup_routers.sh", flush=True)
                    continue
                print(f"[bench] {name} (turn {turn + 1}/{args.turns})", flush=True)
                with ro._router(name, urls, logs) as (url, pid):
                    out = logs / f"{name}-{turn}"
                    results[name] = _split(url, pid, worker_pids, args.requests, args.window_s, model, out)
            report["turns"].append(results)
    report["summary"] = _summary(report["turns"])
    out = save_report(report)
    _print(report["summary"])
    print(f"\nresults: {out}")
    return 0


def _pids_of(urls: list[str]) -> list[int]:
    """The mock workers' pids (``ro._workers`` yields only their URLs): this process's children
    running ``mock-server``."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"mock-server" in Path(f"/proc/{child}/cmdline").read_bytes():
                pids.append(int(child))
    if len(pids) != len(urls):
        raise RuntimeError(f"found {len(pids)} mock workers, expected {len(urls)}")
    return pids


def _split(
    url: str, pid: int | None, workers: list[int], n: int, window: float, model: Path, out: Path
) -> dict[str, Any]:
    cmd = [*ro.TOKENMILL, "bench", "run", url, "--model", "mock", "--concurrency", str(CONCURRENCY)]
    cmd += ["--requests", str(n), "--prompt-tokens", "16", "--output-tokens", "8", "--tokenizer", str(model)]
    cmd += ["--check-tokens", "0", "-o", str(out), "--no-stream"]
    if url in ro.KEYS:
        cmd += ["--api-key", ro.KEYS[url]]
    load = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The load is flowing once the first worker spends CPU; a second more for it to settle.
        start = _cpu_s(workers[0])
        while _cpu_s(workers[0]) - start < 0.05:
            if load.poll() is not None:
                raise RuntimeError(f"the load generator exited with {load.returncode} before its load")
            time.sleep(0.02)
        time.sleep(1.0)
        procs = {"router": pid, "workers": None, "load": load.pid}
        cpu0 = {k: _cpu_s(p) for k, p in procs.items() if p} | {"workers": sum(map(_cpu_s, workers))}
        host0, t0 = _host_s(), time.monotonic()
        time.sleep(window)
        cpu1 = {k: _cpu_s(p) for k, p in procs.items() if p} | {"workers": sum(map(_cpu_s, workers))}
        host1, t1 = _host_s(), time.monotonic()
        if load.poll() is not None:
            raise RuntimeError("the load ended inside the window: raise --requests")
        load.wait()
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    s = json.loads(out.with_name(out.name + ".json").read_text())["summary"]
    requests = s["request_tput"] * (t1 - t0)  # over the window, at the run's steady rate
    total, idle = host1[0] - host0[0], host1[1] - host0[1]
    per_request = {k: (cpu1[k] - cpu0[k]) / requests * 1e6 for k in cpu0}
    return {
        "req_s": s["request_tput"],
        "e2e_p50_ms": s["e2e"]["median"] * 1000,
        "host_busy": 1 - idle / total,
        "router_core_share": (cpu1["router"] - cpu0["router"]) / (t1 - t0) if pid else None,
        "cpu_us_per_request": per_request,
    }


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_s() -> tuple[float, float]:
    """(all, idle + iowait) CPU seconds of the host, summed over its cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) / os.sysconf("SC_CLK_TCK"), (values[3] + values[4]) / os.sysconf("SC_CLK_TCK")


def _summary(turns: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    names = [n for n in turns[0]]
    summary: dict[str, Any] = {}
    for name in names:
        runs = [t[name] for t in turns if name in t]
        parts = runs[0]["cpu_us_per_request"].keys()
        summary[name] = {
            "req_s": statistics.median(r["req_s"] for r in runs),
            "e2e_p50_ms": statistics.median(r["e2e_p50_ms"] for r in runs),
            "host_busy": statistics.median(r["host_busy"] for r in runs),
            "router_core_share": statistics.median(r["router_core_share"] or 0.0 for r in runs),
            "cpu_us_per_request": {
                k: statistics.median(r["cpu_us_per_request"][k] for r in runs) for k in parts
            },
        }
    for name in names:  # each turn's added latency over vllm-router's, as router_overhead.py gives it
        ratios = [
            (t[name]["e2e_p50_ms"] - t["direct"]["e2e_p50_ms"])
            / (t["vllm-router"]["e2e_p50_ms"] - t["direct"]["e2e_p50_ms"])
            for t in turns
            if {"direct", "vllm-router", name} <= t.keys() and name not in ("direct", "vllm-router")
        ]
        if ratios:
            summary[name]["added_vs_vllm_router"] = {"median": statistics.median(ratios), "turns": ratios}
    return summary


def _print(summary: dict[str, Any]) -> None:
    print(f"\n## Where a request's CPU goes, whole responses at concurrency {CONCURRENCY} (medians)\n")
    print(
        "| router | req/s | E2E p50 ms | host busy | router's core share | CPU us/request: router | workers "
        "| load generator |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        c = s["cpu_us_per_request"]
        cpu = f"{c.get('router', 0):.0f} | {c['workers']:.0f} | {c['load']:.0f}"
        print(
            f"| {name} | {s['req_s']:.0f} | {s['e2e_p50_ms']:.2f} | {s['host_busy']:.0%} "
            f"| {s['router_core_share']:.2f} | {cpu} |"
        )
    for name, s in summary.items():
        if "added_vs_vllm_router" in s:
            r = s["added_vs_vllm_router"]
            turns = ", ".join(f"{x:.2f}" for x in r["turns"])
            print(f"\n{name}: added E2E p50 / vllm-router's {r['median']:.2f}x (turns: {turns})", end="")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
