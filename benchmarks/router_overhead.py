"""Router overhead (issue 6): what a router adds to each request, against vllm-router and sglang-router.

Two instant workers (`tokenmill bench mock-server --ttft 0 --itl 0`, 8 output
tokens) behind each router in turn, all with round_robin (LiteLLM: its default,
simple-shuffle); the same loads by
`tokenmill bench run` (one client process, streaming chat):

- concurrency 32, `--requests` requests: requests/s through the router, TTFT
  and end-to-end latency p50/p99, and the router's CPU time per request (its
  process tree's utime + stime over the run, from /proc);
- concurrency 1: the latency a single streamed request gains.

"tokenmill-gateway" is `tokenmill route --gateway-config` with one team and no
limits: keys, the admission queue and a ledger row per request on top of the
router. "litellm" is the LiteLLM proxy (`benchmarks/peers/setup_litellm.sh`), one
process, both workers as deployments of one model, checking a master key: the
gateway most teams glue in front of their models (without a Postgres database
it keeps no per-key usage, so it does less per request than tokenmill's).
"direct" is the same load straight to one worker; "added" is a router's figure
minus direct's in the same turn. `--turns N` runs every router N times in
turn (direct, tokenmill, vllm-router, sglang-router, then again), so slow
spells of the shared machine hit all alike; tables give medians over turns
and the median of the per-turn ratios to vllm-router.

Cores: by default all share every core. `--router-cores 1` gives a router a
core of its own and the load generator and workers the rest, as in
production (`bench_process.split_cores` says why it matters): on two cores
the load side is then the bottleneck, every router's added latency is within
the noise of the direct run, and the router's CPU per request is the figure
that tells routers apart.
Results: `.bench/results/router_overhead-<timestamp>.json`.

    benchmarks/peers/setup_routers.sh                # vllm-router, sglang-router into .peers/routers
    .venv/bin/python benchmarks/router_overhead.py   # ~2 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench_model import ensure_bench_model
from bench_process import RESULTS, ROOT, one_run_at_a_time, pin_to, report_header, save_report, split_cores

TOKENMILL = [sys.executable, "-m", "tokenmill.cli.main"]
PEERS = ROOT / ".peers" / "routers" / "bin"
LITELLM = ROOT / ".peers" / "litellm" / "bin" / "litellm"  # benchmarks/peers/setup_litellm.sh
LITELLM_KEY = "sk-bench"  # its master key: without a database, the only key LiteLLM checks
ROUTERS = ("direct", "tokenmill", "vllm-router", "sglang-router")
KEYS: dict[str, str] = {}  # router URL -> the API key its gateway wants (tokenmill-gateway)
ROUTER_CPUS: set[int] | None = None  # the cores routers are pinned to (None: they share all)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    model = ensure_bench_model()  # its tokenizer counts the synthetic prompts
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"router_overhead-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    report = report_header("router_overhead", stamp, argv, args, model)
    report["turns"] = []
    loads = args.loads.split(",")
    global ROUTER_CPUS
    ROUTER_CPUS = split_cores(args.router_cores)
    report["router_cpus"] = sorted(ROUTER_CPUS) if ROUTER_CPUS else None
    with one_run_at_a_time(), _workers(2, logs) as workers:
        for turn in range(args.turns):
            results: dict[str, dict[str, Any]] = {}
            for name in args.routers.split(","):
                if not _installed(name):
                    setup = "setup_litellm.sh" if name == "litellm" else "setup_routers.sh"
                    print(f"[bench] {name}: missing, run benchmarks/peers/{setup}", flush=True)
                    continue
                print(f"[bench] {name} (turn {turn + 1}/{args.turns})", flush=True)
                tag = f"{name}-{turn}"
                with _router(name, workers, logs) as (url, pid):
                    results[name] = {}
                    if "c32" in loads:
                        results[name]["c32"] = _load(url, pid, 32, args.requests, model, logs / f"{tag}-c32")
                    if "c1" in loads:
                        results[name]["c1"] = _load(
                            url, pid, 1, args.requests // 10, model, logs / f"{tag}-c1"
                        )
                    if "c32_whole" in loads:
                        results[name]["c32_whole"] = _load(
                            url, pid, 32, args.requests, model, logs / f"{tag}-c32w", stream=False
                        )
            report["turns"].append(results)
    out = save_report(report)
    _print_table(report)
    print(f"\nresults: {out}")
    return 0


@contextlib.contextmanager
def _workers(n: int, logs: Path) -> Iterator[list[str]]:
    procs, urls = [], []
    try:
        for i in range(n):
            cmd = [*TOKENMILL, "bench", "mock-server", "--port", "0", "--ttft", "0", "--itl", "0"]
            cmd += ["--output-tokens", "8", "--worker-id", f"worker-{i}"]
            proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
            assert proc.stderr is not None
            line = proc.stderr.readline()
            procs.append(proc)
            urls.append(line.split("ready: ")[1].split("/v1")[0])
        (logs / "workers.txt").write_text("\n".join(urls) + "\n")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


@contextlib.contextmanager
def _router(
    name: str,
    workers: list[str],
    logs: Path,
    policy: str = "round_robin",
    model: str = "mock",
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[str, int | None]]:
    """``name``'s router in front of ``workers`` (``direct``: the first worker itself)."""
    if name == "direct":
        yield workers[0], None
        return
    port = _free_port()
    env = None  # this process's
    metrics = ["--prometheus-port", str(_free_port())]  # each its own: both default to 29000
    if name.startswith("tokenmill"):
        cmd = [*TOKENMILL, "route", "--policy", policy, "--port", str(port)]
        for w in workers:
            cmd += ["--worker", w]
        cmd += list(extra)
        if name == "tokenmill-gateway":  # one team without limits: what keys, admission and the ledger cost
            config = logs / f"gateway-{port}.yaml"
            config.write_text(f"ledger: gateway-{port}.db\nteams:\n  bench: {{}}\n")
            create = [*TOKENMILL, "keys", "create", "--team", "bench", "--config", str(config)]
            KEYS[f"http://127.0.0.1:{port}"] = subprocess.run(
                create, capture_output=True, text=True, check=True, timeout=60
            ).stdout.strip()
            cmd += ["--gateway-config", str(config)]
    elif name == "litellm":  # the proxy most teams put in front of their models, one process
        config = logs / f"litellm-{port}.yaml"
        deployments = "".join(
            f"  - model_name: {model}\n"
            f"    litellm_params: {{model: openai/{model}, api_base: {w}/v1, api_key: none}}\n"
            for w in workers
        )
        config.write_text(f"model_list:\n{deployments}general_settings:\n  master_key: {LITELLM_KEY}\n")
        KEYS[f"http://127.0.0.1:{port}"] = LITELLM_KEY
        cmd = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--telemetry", "False"]
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # (else it fetches prices from GitHub)
    elif name == "vllm-router":
        cmd = [
            str(PEERS / "vllm-router"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--policy",
            policy,
        ]
        cmd += [*metrics, "--worker-urls", *workers]
    else:
        cmd = [str(PEERS / "sglang-router"), "launch", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--policy", policy, *metrics, "--worker-urls", *workers]
    log = (logs / f"{name}.log").open("w")
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=pin_to(ROUTER_CPUS),
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, 60, model)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _installed(name: str) -> bool:
    if name.startswith(("direct", "tokenmill")):
        return True
    return LITELLM.exists() if name == "litellm" else (PEERS / name).exists()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, model: str = "mock") -> None:
    """Until a chat request through the router succeeds (routers differ in what else they serve)."""
    deadline = time.monotonic() + timeout
    body = {"model": model, "messages": [{"role": "user", "content": "ready?"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            headers = {"authorization": f"Bearer {KEYS[url]}"} if url in KEYS else None
            if (
                httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=2).status_code
                == 200
            ):
                return
        time.sleep(0.3)
    raise RuntimeError(f"router at {url} not answering after {timeout:.0f} s")


def _load(
    url: str, pid: int | None, concurrency: int, n: int, model: Path, out: Path, stream: bool = True
) -> dict[str, Any]:
    cpu0 = _tree_cpu_s(pid)
    cmd = [*TOKENMILL, "bench", "run", url, "--model", "mock", "--concurrency", str(concurrency)]
    cmd += ["--requests", str(n), "--prompt-tokens", "16", "--output-tokens", "8", "--tokenizer", str(model)]
    cmd += ["--check-tokens", "0", "-o", str(out), "--stream" if stream else "--no-stream"]
    if url in KEYS:
        cmd += ["--api-key", KEYS[url]]
    subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=900)
    cpu = _tree_cpu_s(pid) - cpu0
    s = json.loads(out.with_name(out.name + ".json").read_text())["summary"]
    return {
        "requests": s["requests"],
        "failed": s["failed"],
        "req_s": s["request_tput"],
        "ttft_ms": {k: s["ttft"][k] * 1000 for k in ("median", "p99")},
        "e2e_ms": {k: s["e2e"][k] * 1000 for k in ("median", "p99")},
        "router_cpu_us_per_request": cpu / s["requests"] * 1e6 if pid else None,
    }


def _tree_cpu_s(pid: int | None) -> float:
    """utime + stime of a process and its descendants (a router may run helper processes)."""
    if pid is None:
        return 0.0
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
    return total / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _print_table(report: dict[str, Any]) -> None:
    turns = report["turns"]
    print(f"\n## Router overhead, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    print(f"- command: `{report['command']}`; medians of {len(turns)} turn(s)")
    cpus = report.get("router_cpus")
    where = f"routers on core(s) {cpus}, load and workers on the rest" if cpus else "all share every core"
    print(f"- {where}\n")
    titles = {
        "c32": "streamed, concurrency 32",
        "c32_whole": "whole responses, concurrency 32",
        "c1": "streamed, concurrency 1",
    }
    names = list(dict.fromkeys(name for t in turns for name in t))
    for load, title in titles.items():
        if not any(load in r for t in turns for r in t.values()):
            continue
        print(f"\n{title}:\n")
        head = ["router", "req/s", "E2E ms p50 / p99", "added E2E p50 ms", "router CPU us/request"]
        print("| " + " | ".join([*head, "added / vllm-router's"]) + " |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name in names:
            runs = [t[name][load] for t in turns if name in t and load in t[name]]
            added = [_added(t, name, load) for t in turns]
            added = [a for a in added if a is not None]
            ratio = [
                _added(t, name, load) / _added(t, "vllm-router", load)
                for t in turns
                if _ratio_ok(t, name, load)
            ]
            cpu = [r["router_cpu_us_per_request"] for r in runs if r["router_cpu_us_per_request"] is not None]
            p50, p99 = _med([r["e2e_ms"]["median"] for r in runs]), _med([r["e2e_ms"]["p99"] for r in runs])
            print(
                f"| {name} | {_med([r['req_s'] for r in runs]):.0f} | {p50:.2f} / {p99:.2f} | "
                f"{f'{_med(added):+.2f}' if added else ''} | {f'{_med(cpu):.0f}' if cpu else ''} | "
                f"{f'{_med(ratio):.2f}' if ratio and name != 'vllm-router' else ''} |"
            )


def _added(turn: dict[str, Any], name: str, load: str) -> float | None:
    if name == "direct" or name not in turn or "direct" not in turn or load not in turn[name]:
        return None
    return turn[name][load]["e2e_ms"]["median"] - turn["direct"][load]["e2e_ms"]["median"]


def _ratio_ok(turn: dict[str, Any], name: str, load: str) -> bool:
    mine, theirs = _added(turn, name, load), _added(turn, "vllm-router", load)
    return mine is not None and theirs is not None and theirs > 0


def _med(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Router overhead against vllm-router and sglang-router.")
    p.add_argument(
        "--requests", type=int, default=3000, help="requests of the concurrency-32 load (c1: a tenth)"
    )
    p.add_argument("--routers", default=",".join(ROUTERS), help="which to measure")
    p.add_argument("--loads", default="c32,c1,c32_whole", help="which loads: c32, c1, c32_whole")
    p.add_argument("--turns", type=int, default=1, help="times to run every router, in turn")
    p.add_argument(
        "--router-cores",
        type=int,
        default=0,
        help="cores routers run on, apart from the load and workers (0: all share every core)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
