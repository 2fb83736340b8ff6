"""Benchmark toolkit (issue 5): how hard one `tokenmill bench` process can drive a server, and
whether its figures agree with guidellm's on the same server and workload.

Two parts, both against `tokenmill bench mock-server` (exact, known timings), in
the same run for both tools:

- ceiling: an instant server (TTFT 0, ITL 0, 4 output tokens) at constant
  rates; for each, the rate each tool achieved, its schedule lag p99 (ours),
  and the TTFT each reports for a server that answers in well under a
  millisecond. Our ceiling is the highest rate whose lag p99 stays under 10 ms.
- agreement: 512 prompt tokens -> 128 output tokens, 8 concurrent, 200
  requests, against a server with TTFT 200 ms and 20 ms between tokens
  (so the exact figures are known: TTFT 200 ms, TPOT 20 ms); mean TTFT, mean
  TPOT (guidellm calls it ITL) and output tok/s side by side, target within 2%.

    .venv/bin/python benchmarks/bench_client.py                     # ~5 min
    .venv/bin/python benchmarks/bench_client.py --rates 500,1000 --skip-agreement

Needs `benchmarks/peers/setup_guidellm.sh` and the benchmark model
(`benchmarks/bench_model.py`: guidellm builds its synthetic prompts with that
tokenizer). Results go to `.bench/results/bench_client-<timestamp>.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model
from bench_process import RESULTS, ROOT, one_run_at_a_time, report_header, run_worker, save_report
from serving_api_processes import GUIDELLM, guidellm_command, guidellm_env

TOKENMILL = [sys.executable, "-m", "tokenmill.cli.main"]
AGREEMENT = {"ttft": 0.2, "itl": 0.02, "prompt": 512, "output": 128, "concurrency": 8, "requests": 200}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not GUIDELLM.exists():
        print(
            f"{GUIDELLM.relative_to(ROOT)} missing: run benchmarks/peers/setup_guidellm.sh", file=sys.stderr
        )
        return 2
    model = ensure_bench_model()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "logs" / f"bench_client-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    report = report_header("bench_client", stamp, argv, args, model)
    with one_run_at_a_time():
        rates = [float(r) for r in args.rates.split(",")]
        with MockServer(0.0, 0.0, 4, logs / "instant-server.log") as url:
            report["ceiling"] = [_ceiling_point(url, rate, args, model, logs) for rate in rates]
        if not args.skip_agreement:
            a = AGREEMENT
            with MockServer(a["ttft"], a["itl"], a["output"], logs / "agreement-server.log") as url:
                report["agreement"] = {
                    "tokenmill": _ours_agreement(url, logs),
                    "guidellm": _guidellm_agreement(url, model, logs),
                }
    out = save_report(report)
    _print_tables(report)
    print(f"\nresults: {out}")
    return 0


class MockServer:
    """`tokenmill bench mock-server` on a free port, in its own process."""

    def __init__(self, ttft: float, itl: float, output_tokens: int, log: Path):
        self.cmd = [*TOKENMILL, "bench", "mock-server", "--port", "0", "--ttft", str(ttft), "--itl", str(itl),
                    "--output-tokens", str(output_tokens)]  # fmt: skip
        self.log = log

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "ready: " not in line:
            raise RuntimeError(f"mock server did not start: {line}")
        self.log.write_text(line)
        return line.split("ready: ")[1].split("/v1")[0]

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def _ours(url: str, args: list[str], out: Path, log: Path) -> dict[str, Any]:
    cmd = [*TOKENMILL, "bench", "run", url, *args, "-o", str(out)]
    done = run_worker(cmd, {"COLUMNS": "160", **_env()}, log, timeout=900)
    summary = out.with_name(out.name + ".json")
    if not summary.exists():
        raise RuntimeError(f"tokenmill bench run failed (exit {done.returncode}); see {log}")
    result = json.loads(summary.read_text())["summary"]
    result["other_load_cores"] = done.other_load_cores
    return result


def _guidellm(url: str, model: Path, profile: str, prompt: int, output: int, requests: int, logs: Path,
              name: str) -> dict[str, Any]:  # fmt: skip
    out = logs / f"guidellm-{name}.json"
    cmd = guidellm_command(url, "mock", model, out, requests=requests, concurrency=0, prompt_tokens=prompt,
                           output_tokens=output, profile=profile)  # fmt: skip
    done = run_worker(
        cmd, guidellm_env(1, logs / f"guidellm-{name}.debug.log"), logs / f"guidellm-{name}.log", 900
    )
    if not out.exists():
        raise RuntimeError(f"guidellm failed (exit {done.returncode}); see {logs / f'guidellm-{name}.log'}")
    return {**parse_guidellm(out), "other_load_cores": done.other_load_cores}


def parse_guidellm(out: Path) -> dict[str, Any]:
    """The figures the tables compare, from guidellm's JSON report."""
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]
    totals = m["request_totals"]
    return {
        "requests": totals["total"],
        "successful": totals["successful"],
        "errored": totals["errored"],
        "duration_s": bench["duration"],
        "achieved_rate": totals["successful"] / bench["duration"] if bench["duration"] else None,
        "req_s_reported": m["requests_per_second"]["successful"]["mean"],
        "ttft_ms": _dist(m["time_to_first_token_ms"]["successful"]),
        "itl_ms": _dist(m["inter_token_latency_ms"]["successful"]),
        "output_tok_s": m["output_tokens_per_second"]["total"]["mean"],
        "dispatch_delay_ms": _dist((m.get("request_dispatch_delay") or {}).get("successful"), scale=1000.0),
    }


def _dist(d: dict[str, Any] | None, scale: float = 1.0) -> dict[str, float] | None:
    if d is None:  # guidellm leaves out what its profile does not measure (dispatch delay when concurrent)
        return None
    return {"mean": d["mean"] * scale, "median": d["median"] * scale, "p99": d["percentiles"]["p99"] * scale}


def _ceiling_point(
    url: str, rate: float, args: argparse.Namespace, model: Path, logs: Path
) -> dict[str, Any]:
    n = int(rate * args.seconds)
    name = f"rate-{rate:g}"
    print(f"[bench] ceiling: {rate:g} req/s, {n} requests", flush=True)
    load = ["--profile", "constant", "--rate", str(rate), "--requests", str(n), "--prompt-tokens", "16",
            "--output-tokens", "4"]  # fmt: skip
    ours = _ours(url, load, logs / f"tokenmill-{name}", logs / f"tokenmill-{name}.log")
    gl = _guidellm(url, model, f"kind=constant,rate={rate:g}", 16, 4, n, logs, name)
    return {"rate": rate, "tokenmill": ours, "guidellm": gl}


def _ours_agreement(url: str, logs: Path) -> dict[str, Any]:
    a = AGREEMENT
    print("[bench] agreement: tokenmill bench", flush=True)
    load = [
        "--profile",
        "concurrency",
        "--concurrency",
        str(a["concurrency"]),
        "--requests",
        str(a["requests"]),
    ]
    load += ["--prompt-tokens", str(a["prompt"]), "--output-tokens", str(a["output"])]
    return _ours(url, load, logs / "tokenmill-agreement", logs / "tokenmill-agreement.log")


def _guidellm_agreement(url: str, model: Path, logs: Path) -> dict[str, Any]:
    a = AGREEMENT
    print("[bench] agreement: guidellm", flush=True)
    profile = f"kind=concurrent,streams={a['concurrency']}"
    return _guidellm(url, model, profile, a["prompt"], a["output"], a["requests"], logs, "agreement")


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _print_tables(report: dict[str, Any]) -> None:
    print(f"\n## Benchmark toolkit, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    print(f"- command: `{report['command']}`\n")
    print("Instant server (TTFT 0, ITL 0, 4 tokens), constant rate, one client process each:\n")
    head = ["asked req/s", "tokenmill achieved", "lag p99 ms", "TTFT ms median / p99", "valid"]
    head += ["guidellm achieved", "guidellm TTFT ms median / p99", "guidellm dispatch delay ms p99"]
    print("| " + " | ".join(head) + " |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for p in report["ceiling"]:
        t, g = p["tokenmill"], p["guidellm"]
        lag = t["schedule_lag"]["p99"] * 1000 if t.get("schedule_lag") else float("nan")
        print(
            f"| {p['rate']:g} | {t['achieved_rate']:.1f} | {lag:.2f} | {t['ttft']['median'] * 1000:.2f} / "
            f"{t['ttft']['p99'] * 1000:.2f} | {'yes' if t['valid'] else 'no'} | {g['achieved_rate']:.1f} | "
            f"{g['ttft_ms']['median']:.2f} / {g['ttft_ms']['p99']:.2f} | "
            f"{g['dispatch_delay_ms']['p99'] if g['dispatch_delay_ms'] else float('nan'):.2f} |"
        )
    if "agreement" not in report:
        return
    a, t, g = AGREEMENT, report["agreement"]["tokenmill"], report["agreement"]["guidellm"]
    load = f"{a['prompt']} in, {a['output']} out, concurrency {a['concurrency']}, {a['requests']} requests"
    print(
        f"\nAgreement: {load}; server TTFT {a['ttft'] * 1000:g} ms, {a['itl'] * 1000:g} ms between tokens\n"
    )
    print("| metric | exact | tokenmill bench | guidellm | tokenmill / guidellm |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = [
        ("mean TTFT ms", a["ttft"] * 1000, t["ttft"]["mean"] * 1000, g["ttft_ms"]["mean"]),
        ("mean TPOT ms (guidellm: ITL)", a["itl"] * 1000, t["tpot"]["mean"] * 1000, g["itl_ms"]["mean"]),
        ("output tok/s", None, t["output_tok_s"], g["output_tok_s"]),
    ]
    for name, exact, ours, theirs in rows:
        ex = f"{exact:.1f}" if exact is not None else ""
        print(f"| {name} | {ex} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.3f} |")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--rates", default="250,500,1000,1500,2000", help="constant rates (req/s) of the ceiling part"
    )
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of load per rate")
    p.add_argument("--skip-agreement", action="store_true", help="only the ceiling part")
    return p.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
