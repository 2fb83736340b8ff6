"""Client SDK (issue 8): `tokenmill batch` against a naive and a fixed-rate client on one fleet.

4 simulated workers (`tokenmill serve --runner simulated`: the real scheduler,
step times from the demo profile) of ``--slots`` batch slots each, the same
``--requests`` completions for every client (``--max-tokens`` tokens, ignore_eos):

- capacity: each worker driven directly with twice its slots in flight (closed
  loop: every slot refilled the step it frees, from the worker's own queue), the
  best any client can do: the fleet's tokens/s that the others are measured by;
- naive: ``asyncio.gather`` of every request at once, round-robin;
- fixed-rate: requests sent at the capacity's request rate, round-robin;
- tokenmill: ``tokenmill batch run`` (the CLI, adaptive concurrency, least in-flight).

Each reports throughput as a fraction of capacity, errors, max/mean requests
over workers, and the workers' busy slots over time (plot). Then, with an
interactive client sending short streamed requests (Poisson, ``--interactive-rate``)
while a batch runs: its TTFT p50/p99 beside naive, and beside tokenmill batch
in throughput mode and in latency mode (``--mode latency --priority -1``).

    .venv/bin/python benchmarks/client_batch.py                 # ~6 min
    .venv/bin/python benchmarks/client_batch.py --requests 1000 # smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_process import ROOT, one_run_at_a_time, report_header, save_report
from sim_fleet import TOKENMILL, simulated_fleet
from tokenmill.client import HTTPTransport

WORKERS = 4
DEMO = ROOT / "src" / "tokenmill" / "engine" / "demo_model"


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": f"Batch question number {i}: summarize it.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }


async def post(http: HTTPTransport, payload: dict[str, Any]) -> tuple[int, str | None, int]:
    """(status, worker, completion tokens) of one whole completion; status 0: no connection."""
    try:
        r = await http.request("POST", "/v1/completions", json=payload)
    except Exception:
        return 0, None, 0
    tokens = r.json()["usage"]["completion_tokens"] if r.status == 200 else 0
    return r.status, r.headers.get("x-tokenmill-worker"), tokens


class Sampler:
    """Busy slots of every worker, from their /metrics, four times a second."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.series: list[tuple[float, float]] = []  # (seconds, busy share of all slots)

    async def run(self, slots: int) -> None:
        transports = [HTTPTransport(u) for u in self.urls]
        start = time.perf_counter()
        try:
            while True:
                running = 0.0
                for t in transports:
                    text = (await t.request("GET", "/metrics")).text
                    running += sum(
                        float(line.rsplit(" ", 1)[1])
                        for line in text.splitlines()
                        if line.startswith("tokenmill_requests_running{")
                    )
                self.series.append((time.perf_counter() - start, running / (slots * len(self.urls))))
                await asyncio.sleep(0.25)
        finally:
            for t in transports:
                await t.aclose()


async def requests_per_worker(urls: list[str]) -> dict[str, float]:
    """Requests each worker has finished, from its own /metrics (names from --worker-id)."""
    counts = {}
    for i, url in enumerate(urls):
        async with HTTPTransport(url) as http:
            text = (await http.request("GET", "/metrics")).text
        counts[f"sim-{i}"] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("tokenmill_requests_total{")
        )
    return counts


def summarize(
    name: str,
    results: list[tuple[int, str | None, int]],
    seconds: float,
    capacity: float | None,
    per_worker: dict[str, float],
) -> dict:
    ok = [r for r in results if r[0] == 200]
    tokens = sum(r[2] for r in ok)
    counts = list(per_worker.values()) or [0.0]
    out = {
        "client": name,
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "imbalance": max(counts) / (sum(counts) / len(counts)) if sum(counts) else None,
        "per_worker": per_worker,
    }
    if capacity:
        out["fraction_of_capacity"] = out["tok_s"] / capacity
    return out


async def capacity(urls: list[str], slots: int, n: int, max_tokens: int) -> tuple[list, float]:
    """Each worker kept at twice its slots, directly: the fleet's ceiling."""
    results: list[tuple[int, str | None, int]] = []
    per = n // len(urls)

    async def worker_loop(url: str) -> None:
        async with HTTPTransport(url, max_connections=2 * slots) as http:
            queue = list(range(per))

            async def slot() -> None:
                while queue:
                    results.append(await post(http, body(queue.pop(), max_tokens)))

            await asyncio.gather(*(slot() for _ in range(2 * slots)))

    start = time.perf_counter()
    await asyncio.gather(*(worker_loop(u) for u in urls))
    return results, time.perf_counter() - start


async def naive(urls: list[str], n: int, max_tokens: int) -> tuple[list, float]:
    transports = [HTTPTransport(u, max_connections=n) for u in urls]
    start = time.perf_counter()
    results = await asyncio.gather(*(post(transports[i % len(urls)], body(i, max_tokens)) for i in range(n)))
    seconds = time.perf_counter() - start
    for t in transports:
        await t.aclose()
    return list(results), seconds


async def fixed_rate(urls: list[str], n: int, max_tokens: int, rate: float) -> tuple[list, float]:
    transports = [HTTPTransport(u, max_connections=n) for u in urls]
    start = time.perf_counter()

    async def send(i: int) -> tuple[int, str | None, int]:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        return await post(transports[i % len(urls)], body(i, max_tokens))

    results = await asyncio.gather(*(send(i) for i in range(n)))
    seconds = time.perf_counter() - start
    for t in transports:
        await t.aclose()
    return list(results), seconds


async def tokenmill_batch(urls: list[str], n: int, max_tokens: int, extra: list[str]) -> tuple[list, float]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "jobs.jsonl"
        src.write_text(
            "".join(
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "method": "POST",
                        "url": "/v1/completions",
                        "body": body(i, max_tokens),
                    }
                )
                + "\n"
                for i in range(n)
            )
        )
        cmd = [*TOKENMILL, "batch", "run", str(src), *(a for u in urls for a in ("--url", u)), *extra]
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        _, stderr = await proc.communicate()
        seconds = time.perf_counter() - start
        results = []
        out = Path(tmp) / "jobs.output.jsonl"
        for line in out.read_text().splitlines() if out.exists() else []:
            response = json.loads(line)["response"]["body"]
            results.append((200, None, response["usage"]["completion_tokens"]))
        errors = Path(tmp) / "jobs.errors.jsonl"
        results += [(500, None, 0)] * (len(errors.read_text().splitlines()) if errors.exists() else 0)
        if proc.returncode not in (0, 1):
            print(stderr.decode()[-2000:], file=sys.stderr)
        return results, seconds


async def interactive(urls: list[str], rate: float, stop: asyncio.Event, seed: int) -> list[float]:
    """Short streamed requests at Poisson ``rate``; their TTFTs."""
    rng = random.Random(seed)
    transports = [HTTPTransport(u) for u in urls]
    ttfts: list[float] = []
    tasks = []

    async def one(i: int) -> None:
        payload = {**body(i, 16), "stream": True, "priority": 0}
        sent = time.perf_counter()
        try:
            async with transports[i % len(urls)].stream("POST", "/v1/completions", json=payload) as r:
                async for event in r.events():
                    if event.data != "[DONE]" and json.loads(event.data)["choices"][0]["text"]:
                        ttfts.append(event.time - sent)
                        break
        except Exception:
            ttfts.append(float("inf"))

    i = 0
    while not stop.is_set():
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    for t in transports:
        await t.aclose()
    return ttfts


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measured(name: str, urls: list[str], slots: int, run: Any, capacity_tok_s: float | None) -> dict:
    """One client's run with the workers' busy slots sampled and their request counts diffed."""
    before = await requests_per_worker(urls)
    sampler = Sampler(urls)
    sampling = asyncio.create_task(sampler.run(slots))
    results, seconds = await run
    sampling.cancel()
    after = await requests_per_worker(urls)
    out = summarize(name, results, seconds, capacity_tok_s, {k: after[k] - before[k] for k in after})
    out["busy"] = sampler.series
    busy = [b for _, b in sampler.series]
    out["busy_mean"] = statistics.fmean(busy) if busy else None
    return out


async def with_interactive(urls: list[str], slots: int, run: Any, rate: float, seed: int) -> dict:
    stop = asyncio.Event()
    users = asyncio.create_task(interactive(urls, rate, stop, seed))
    await asyncio.sleep(1.0)  # let the batch fill the fleet first
    await run
    stop.set()
    ttfts = await users
    return {
        "interactive_requests": len(ttfts),
        "ttft_p50": quantile(ttfts, 0.5),
        "ttft_p99": quantile(ttfts, 0.99),
    }


async def main_async(args: argparse.Namespace) -> dict:
    options = ["--max-num-seqs", str(args.slots)]
    report: dict[str, Any] = {"clients": [], "interactive": []}
    with simulated_fleet(WORKERS, options) as urls:
        n, mt, slots = args.requests, args.max_tokens, args.slots
        cap = await measured(
            "capacity: each worker at 2x its slots", urls, slots, capacity(urls, slots, n, mt), None
        )
        capacity_tok_s = cap["tok_s"]
        cap_rate = cap["ok"] / cap["seconds"]
        report["clients"].append(cap)
        runs = [
            ("naive: gather all at once", naive(urls, n, mt)),
            (f"fixed rate: {cap_rate:.0f} req/s (the capacity)", fixed_rate(urls, n, mt, cap_rate)),
            ("tokenmill batch", tokenmill_batch(urls, n, mt, [])),
        ]
        for name, run in runs:
            report["clients"].append(await measured(name, urls, slots, run, capacity_tok_s))
            print(_client_row(report["clients"][-1]), flush=True)
        shared = [
            ("naive", naive(urls, n, mt)),
            ("tokenmill batch (throughput)", tokenmill_batch(urls, n, mt, [])),
            (
                "tokenmill batch --mode latency --priority -1",
                tokenmill_batch(urls, n, mt, ["--mode", "latency", "--priority", "-1"]),
            ),
        ]
        for name, run in shared:
            row = {
                "batch_client": name,
                **await with_interactive(urls, slots, run, args.interactive_rate, args.seed),
            }
            report["interactive"].append(row)
            print(row, flush=True)
    return report


def _client_row(c: dict) -> str:
    fraction = f"{c['fraction_of_capacity']:.3f}" if "fraction_of_capacity" in c else "1 (reference)"
    busy = f"{c['busy_mean']:.2f}" if c.get("busy_mean") is not None else "-"
    imbalance = f"{c['imbalance']:.2f}" if c["imbalance"] is not None else "-"
    return (
        f"| {c['client']} | {c['tok_s']:.0f} | {fraction} | {c['ok']}/{c['requests']} | {c['errors']} "
        f"| {imbalance} | {busy} | {c['seconds']:.1f} |"
    )


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for c in report["clients"]:
        if c["busy"]:
            xs, ys = zip(*c["busy"], strict=True)
            ax.plot(xs, ys, label=c["client"])
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("busy slots / all slots")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Worker utilization over time")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="requests per client run")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--slots", type=int, default=16, help="batch slots per worker (--max-num-seqs)")
    parser.add_argument(
        "--interactive-rate", type=float, default=4.0, help="interactive requests/s during a batch"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with one_run_at_a_time():
        report = {**report_header("client_batch", stamp, None, args, DEMO), **asyncio.run(main_async(args))}
    print("| client | output tok/s | of capacity | ok | errors | max/mean requests | mean busy | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in report["clients"]:
        print(_client_row(c))
    print("\n| batch client | interactive requests | TTFT p50 ms | TTFT p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for r in report["interactive"]:
        p50, p99 = r["ttft_p50"] * 1000, r["ttft_p99"] * 1000
        print(f"| {r['batch_client']} | {r['interactive_requests']} | {p50:.1f} | {p99:.1f} |")
    path = save_report(report)
    plot(report, ROOT / path.with_suffix(".png"))
    print(f"report: {path}; plot: {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
