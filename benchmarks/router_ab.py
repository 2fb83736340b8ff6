"""A router change measured against the code before it: both serve the same load at the same time.

On a shared, noisy machine a router's CPU per request moves by ±20% between runs
seconds apart, more than most changes save. Here two routers, each run from its
own source tree (``PYTHONPATH``), sit in front of the same two instant workers
and take the same load at once: one client process, 32 connections, every other
one to each router, so a slow spell of the machine hits both alike. Each round
starts both afresh (in alternating order) and measures, per request, each one's
CPU (its process tree's utime + stime, from /proc), its main thread's CPU (the
event loop's, which bounds a router's throughput whatever other threads it runs)
and the median latency of its requests as the one client saw them; the ratio of
each round is B's over A's, and the figures are the medians of the rounds' ratios. (The latency is mostly the
client's and the workers' on a machine this small: it tells a change that makes
requests wait, not a few percent of CPU.)

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/router_ab.py /tmp/before/src src                   # gateway, whole
    .venv/bin/python benchmarks/router_ab.py /tmp/before/src src --router tokenmill --stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import router_overhead as ro
from bench_process import RESULTS, one_run_at_a_time
from tokenmill.client import HTTPTransport


async def _drive(urls: list[str], requests: int, stream: bool) -> dict[str, list[float]]:
    """``requests`` chat requests over 32 connections, every other one to each router; each
    router's latencies (seconds, request sent to response ended)."""
    body = {"model": "mock", "messages": [{"role": "user", "content": "hello there " * 6}], "max_tokens": 8}
    body["stream"] = stream
    transports = {url: HTTPTransport(url, max_connections=64) for url in urls}
    latencies: dict[str, list[float]] = {url: [] for url in urls}
    left = requests

    async def connection(i: int) -> None:
        nonlocal left
        url = urls[i % len(urls)]
        headers = {"authorization": f"Bearer {ro.KEYS[url]}"} if url in ro.KEYS else {}
        while left > 0:
            left -= 1
            sent = time.perf_counter()
            async with transports[url].stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url} answered {r.status}")
                while await r.read_chunk() is not None:
                    pass
            latencies[url].append(time.perf_counter() - sent)

    try:
        await asyncio.gather(*(connection(i) for i in range(32)))
    finally:
        for t in transports.values():
            await t.aclose()
    return latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU per request of a router from two source trees, paired.")
    p.add_argument("before", type=Path, help="source folder (the one holding tokenmill/) of the code before")
    p.add_argument("after", type=Path, help="source folder of the code after")
    p.add_argument("--router", default="tokenmill-gateway", choices=["tokenmill", "tokenmill-gateway"])
    p.add_argument("--stream", action="store_true", help="streamed responses (default: whole)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=4000, help="requests a round, both routers together")
    args = p.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        if not (tree / "tokenmill" / "__init__.py").exists():
            p.error(f"{tree} holds no tokenmill package (give the src folder)")
    logs = RESULTS / "logs" / f"router_ab-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    loop_cpu: dict[str, list[float]] = {name: [] for name in trees}  # the main thread's alone
    latency: dict[str, list[float]] = {name: [] for name in trees}  # median of each round, ms
    with one_run_at_a_time(), ro._workers(2, logs) as workers:
        for r in range(args.rounds):
            with contextlib.ExitStack() as stack:
                routers = {}
                for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                    ro.TOKENMILL = [
                        "env",
                        f"PYTHONPATH={trees[name]}",
                        sys.executable,
                        "-m",
                        "tokenmill.cli.main",
                    ]
                    routers[name] = stack.enter_context(ro._router(args.router, workers, logs))
                urls = [routers[name][0] for name in trees]
                asyncio.run(_drive(urls, 1000, args.stream))  # warm-up
                before = {name: ro._tree_cpu_s(pid) for name, (_, pid) in routers.items()}
                before_loop = {name: _main_thread_cpu_s(pid) for name, (_, pid) in routers.items()}
                latencies = asyncio.run(_drive(urls, args.requests, args.stream))
                for name, (url, pid) in routers.items():
                    cpu[name].append((ro._tree_cpu_s(pid) - before[name]) / len(latencies[url]) * 1e6)
                    loop_s = _main_thread_cpu_s(pid) - before_loop[name]
                    loop_cpu[name].append(loop_s / len(latencies[url]) * 1e6)
                    latency[name].append(statistics.median(latencies[url]) * 1e3)
            print(
                f"[bench] round {r + 1}: "
                + ", ".join(f"{n} {cpu[n][-1]:.0f} us CPU, {latency[n][-1]:.2f} ms" for n in trees),
                flush=True,
            )
    ratios = [a / b for a, b in zip(cpu["after"], cpu["before"], strict=True)]
    latency_ratios = [a / b for a, b in zip(latency["after"], latency["before"], strict=True)]
    kind = "streamed" if args.stream else "whole"
    print(f"\n{args.router}, {kind} responses, {args.rounds} rounds of {args.requests} requests:")
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"- CPU a request, median: before {medians['before']:.0f} us, after {medians['after']:.0f} us")
    print(f"- after / before, median of the rounds' ratios: {statistics.median(ratios):.3f} "
          f"({sum(x < 1 for x in ratios)} of {len(ratios)} rounds below 1)")  # fmt: skip
    loop = {name: statistics.median(values) for name, values in loop_cpu.items()}
    loop_ratios = [a / b for a, b in zip(loop_cpu["after"], loop_cpu["before"], strict=True)]
    print(f"- the event loop thread's CPU a request, median: before {loop['before']:.0f} us, after "
          f"{loop['after']:.0f} us; after / before, median of the rounds' ratios: "
          f"{statistics.median(loop_ratios):.3f}")  # fmt: skip
    lat = {name: statistics.median(values) for name, values in latency.items()}
    print(f"- latency a request (the client's, both routers' through the same client), median: "
          f"before {lat['before']:.2f} ms, after {lat['after']:.2f} ms; after / before, median of the "
          f"rounds' ratios: {statistics.median(latency_ratios):.3f}")  # fmt: skip
    return 0


def _main_thread_cpu_s(pid: int | None) -> float:
    """utime + stime of a process's main thread: a router's event loop, whose time bounds its
    throughput whatever other threads it runs."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    raise SystemExit(main())
