"""Gateway priority and fair queuing under overload (issue 7), against the same gateway without them.

8 simulated tokenmill workers (`--runner simulated`, 8 requests at once each:
64 slots) behind `tokenmill route --gateway-config`. Four teams send synthetic
chat (256-token prompts, 64 output tokens) at once, open loop (Poisson), one
`tokenmill bench run` per team with its own key, for `--seconds`:

- premium: priority 10, 10% of the offered load;
- standard-a, standard-b: priority 0, 20% each;
- flood: priority 0, 50%;

together `--load` (1.5) times the fleet's capacity, which the run measures
first (a closed loop of 64 through the gateway). The same loads then run
against the same gateway configured with every team at priority 0 and first
come, first served admission: what a router without priority classes or
fair queuing gives. And premium alone, for its idle TTFT.

Reported per team: TTFT p50/p99 of served requests, served requests/s, the
share of the standard band's served requests, and 429s (the queue's bound:
requests that waited `max_wait_s` or found their band full).

`--step-scale F` multiplies the simulated workers' step times (the demo CPU
profile's) by F. With the demo profile the eight workers could serve far more
than two cores can carry through the gateway, the load generators and the
workers' own HTTP: the "capacity" measured is then the host's CPU, every
process waits for a core, and premium's latency says more about that than
about the gateway. Slower steps (a larger model on a GPU: F = 5 gives decode
steps of about 35 ms at 8 running) make the fleet the bottleneck, as it is in
production, with CPU to spare. The report gives the host's CPU busy share for
each phase, so a reader can tell which one a run measured.

By default all share every core; `--gateway-cores N` gives the gateway N
cores of its own and the workers and load generators the rest
(`bench_process.split_cores`). Not on two cores: eight workers and four load
generators on one core cannot reach the fleet's capacity, and the "overload"
is then none (run 20261201-170158: every team served what it offered).

    .venv/bin/python benchmarks/gateway_fairness.py      # ~6 min
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

from bench_process import RESULTS, ROOT, one_run_at_a_time, pin_to, report_header, save_report, split_cores
from router_overhead import TOKENMILL, _free_port
from sim_fleet import simulated_fleet

DEMO = ROOT / "src" / "tokenmill" / "engine" / "demo_model"
DEMO_PROFILE = ROOT / "src" / "tokenmill" / "engine" / "profiles" / "demo-cpu.json"
WORKERS, SLOTS = 8, 8
SHARES = {"premium": 0.10, "standard-a": 0.20, "standard-b": 0.20, "flood": 0.50}
STANDARD = ("standard-a", "standard-b", "flood")
ADMIN_KEY = "fairness-bench-admin"  # the gateway's admin key (config default: $TOKENMILL_ADMIN_KEY)
GATEWAY_CPUS: set[int] | None = None  # the cores the gateway is pinned to (None: it shares all)


def config_text(fair: bool, max_wait_s: float) -> str:
    premium = 10 if fair else 0
    teams = "\n".join(f"  {team}: {{priority: {premium if team == 'premium' else 0}}}" for team in SHARES)
    return (
        f"ledger: usage.db\nqueue: {{max_wait_s: {max_wait_s}, fair: {'true' if fair else 'false'}}}\n"
        f"teams:\n{teams}\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"gateway_fairness-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    report = report_header("gateway_fairness", stamp, argv, args, DEMO)
    global GATEWAY_CPUS
    GATEWAY_CPUS = split_cores(args.gateway_cores)
    report["gateway_cpus"] = sorted(GATEWAY_CPUS) if GATEWAY_CPUS else None
    options = ["--max-num-seqs", str(SLOTS)]
    if args.step_scale != 1.0:
        options += ["--timing-profile", str(_scaled_profile(args.step_scale, logs / "profile.json"))]
    busy = report["host_cpu_busy"] = {}
    with one_run_at_a_time(), simulated_fleet(WORKERS, options) as workers:
        with _gateway(workers, logs / "capacity", fair=True, max_wait_s=args.max_wait_s) as (url, keys):
            out = logs / "capacity" / "load"
            cmd = _bench_cmd(
                url, keys["standard-a"], out, concurrency=WORKERS * SLOTS, requests=args.capacity_requests
            )
            with _host_cpu(busy, "capacity"):
                capacity = _start(cmd, out).result()["req_s"]
        report["capacity_req_s"] = capacity
        print(f"[bench] capacity {capacity:.1f} req/s; offering {args.load}x", flush=True)
        rates = {team: share * args.load * capacity for team, share in SHARES.items()}
        report["rates"] = rates
        with _gateway(workers, logs / "idle", fair=True, max_wait_s=args.max_wait_s) as (url, keys):
            out = logs / "idle" / "premium"
            cmd = _bench_cmd(url, keys["premium"], out, rates["premium"], args.seconds)
            with _host_cpu(busy, "premium alone"):
                report["premium_idle"] = _start(cmd, out).result()
        for label, fair in (("gateway", True), ("no priority, first come first served", False)):
            print(f"[bench] {label}", flush=True)
            gateway = _gateway(workers, logs / label[:7], fair=fair, max_wait_s=args.max_wait_s)
            with gateway as (url, keys), _host_cpu(busy, label):
                report[label] = _all_teams(url, keys, rates, args.seconds, logs / label[:7])
    out = save_report(report)
    _print(report)
    print(f"\nresults: {out}")
    return 0


def _scaled_profile(scale: float, path: Path) -> Path:
    """The demo CPU profile with every step-time term ``scale`` times larger."""
    profile = json.loads(DEMO_PROFILE.read_text())
    for key in [k for k in profile if k.endswith("_s")]:
        profile[key] *= scale
    profile["model"] = f"demo, step times x{scale:g}"
    path.write_text(json.dumps(profile, indent=2))
    return path


@contextlib.contextmanager
def _host_cpu(busy: dict[str, float], phase: str) -> Iterator[None]:
    """The share of the host's CPU time that was busy while the block ran (/proc/stat)."""

    def times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    total, idle = times()
    yield
    total2, idle2 = times()
    busy[phase] = 1 - (idle2 - idle) / max(total2 - total, 1)


@contextlib.contextmanager
def _gateway(
    workers: list[str], folder: Path, fair: bool, max_wait_s: float
) -> Iterator[tuple[str, dict[str, str]]]:
    """A fresh gateway (its own ledger) in front of the fleet, and a key per team."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "gateway.yaml"
    config.write_text(config_text(fair, max_wait_s))
    keys = {}
    for team in SHARES:
        cmd = [*TOKENMILL, "keys", "create", "--team", team, "--config", str(config)]
        keys[team] = subprocess.run(
            cmd, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    port = _free_port()
    cmd = [
        *TOKENMILL,
        "route",
        "--port",
        str(port),
        "--policy",
        "least_load",
        "--gateway-config",
        str(config),
    ]
    for w in workers:
        cmd += ["--worker", w]
    log = (folder / "gateway.log").open("w")
    env = {**os.environ, "TOKENMILL_ADMIN_KEY": ADMIN_KEY}  # /router/workers needs it behind a gateway
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=pin_to(GATEWAY_CPUS),
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        import httpx

        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                admin = {"authorization": f"Bearer {ADMIN_KEY}"}
                status = httpx.get(f"{url}/router/workers", headers=admin, timeout=2).json()
                if all(w["slots"] == SLOTS for w in status["workers"]):  # the workers' slots are known
                    break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"gateway not ready; see {folder / 'gateway.log'}")
        yield url, keys
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _bench_cmd(
    url: str,
    key: str,
    out: Path,
    rate: float | None = None,
    seconds: float | None = None,
    concurrency: int | None = None,
    requests: int | None = None,
    seed: int = 0,
) -> list[str]:
    """One team's load: open loop at ``rate`` for ``seconds``, or closed loop of ``concurrency``."""
    cmd = [*TOKENMILL, "bench", "run", url, "--model", "demo", "--api-key", key, "--prompt-tokens", "256"]
    cmd += ["--output-tokens", "64", "--tokenizer", str(DEMO), "--check-tokens", "0", "-o", str(out)]
    cmd += ["--seed", str(seed)]
    if rate is not None:
        assert seconds is not None
        cmd += [
            "--profile",
            "poisson",
            "--rate",
            f"{rate:.3f}",
            "--requests",
            str(max(1, round(rate * seconds))),
        ]
        return [*cmd, "--max-lag-p99", "5"]
    return [*cmd, "--concurrency", str(concurrency), "--requests", str(requests)]


class _Run:
    def __init__(self, proc: subprocess.Popen[str], out: Path) -> None:
        self.proc, self.out = proc, out

    def result(self) -> dict[str, Any]:
        _, err = self.proc.communicate(timeout=1800)
        summary = self.out.with_name(self.out.name + ".json")
        if not summary.exists():
            raise RuntimeError(f"bench run failed: {err[-800:]}")
        s = json.loads(summary.read_text())["summary"]
        served = s["requests"] - s["failed"]
        return {
            "requests": s["requests"],
            "served": served,
            "errors": s["errors"],
            "http_429": (s["errors"] or {}).get("http_429", 0),
            "req_s": s["request_tput"],
            "ttft_ms": {k: (s["ttft"][k] or 0) * 1000 for k in ("median", "p99")} if s.get("ttft") else None,
        }


def _start(cmd: list[str], out: Path) -> _Run:
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COLUMNS": "200"}
    return _Run(
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env), out
    )


def _all_teams(
    url: str, keys: dict[str, str], rates: dict[str, float], seconds: float, folder: Path
) -> dict[str, Any]:
    """Every team's load at once; each team's figures and its share of the standard band."""
    runs = {}
    for seed, (team, rate) in enumerate(rates.items()):
        out = folder / team
        runs[team] = _start(_bench_cmd(url, keys[team], out, rate, seconds, seed=seed), out)
    results = {team: run.result() for team, run in runs.items()}
    served = sum(results[t]["served"] for t in STANDARD)
    for t in STANDARD:
        results[t]["standard_share"] = results[t]["served"] / served if served else None
    return results


def _print(report: dict[str, Any]) -> None:
    print(f"\n## Gateway under overload, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; `{report['command']}`")
    offered = sum(report["rates"].values())
    cpus = report.get("gateway_cpus")
    print(f"- gateway on core(s) {cpus}, workers and load on the rest" if cpus else "- all share every core")
    scale = report["options"].get("step_scale", 1.0)
    print(f"- simulated step times: the demo CPU profile's x{scale:g}")
    print(f"- capacity {report['capacity_req_s']:.1f} req/s; offered {offered:.1f} req/s")
    busy = report.get("host_cpu_busy", {})
    print("- host CPU busy: " + ", ".join(f"{phase} {share:.0%}" for phase, share in busy.items()) + "\n")
    idle = report["premium_idle"]["ttft_ms"]
    print(f"premium alone: TTFT p50 {idle['median']:.1f} ms, p99 {idle['p99']:.1f} ms\n")
    head = ["setup", "team", "offered req/s", "served req/s", "TTFT ms p50 / p99", "share of standard served"]
    print("| " + " | ".join([*head, "429s"]) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label in ("gateway", "no priority, first come first served"):
        for team, r in report[label].items():
            ttft = r["ttft_ms"]
            share = r.get("standard_share")
            print(
                f"| {label} | {team} | {report['rates'][team]:.1f} | {r['req_s']:.1f} | "
                f"{ttft['median']:.1f} / {ttft['p99']:.1f} | {'' if share is None else f'{share:.1%}'} | "
                f"{r['http_429']} |"
            )


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Gateway priority and fair queuing under overload.")
    p.add_argument("--load", type=float, default=1.5, help="offered load over measured capacity")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each loaded run")
    p.add_argument("--max-wait-s", type=float, default=10.0, help="the admission queue's max wait")
    p.add_argument("--capacity-requests", type=int, default=800, help="requests of the capacity run")
    p.add_argument(
        "--step-scale",
        type=_positive,
        default=1.0,
        help="the simulated workers' step times over the demo CPU profile's (5: fleet-bound, not CPU-bound)",
    )
    p.add_argument(
        "--gateway-cores",
        type=int,
        default=0,
        help="cores the gateway runs on, apart from the workers and load (0: all share every core)",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
