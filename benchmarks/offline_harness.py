"""The common body of the offline workers (one per engine, one process each).

A worker only says how to load its engine and how to run a workload on it;
this module does the rest the same way for every engine, so that the figures
differ by engine and nothing else: start-up measured from the moment the parent
spawned the process (interpreter, imports, weights, compilation all count),
one warm-up run per case, the median of ``--repeats`` timed runs, peak RSS of
the process tree, and results written as JSON after every case (a worker killed
by the parent's timeout still leaves what it measured). Standard library only:
the vllm venv imports it too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from workloads import WORKLOAD_NAMES, Workload, make_workload

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROGRESS = "[bench]"  # the parent echoes lines with this prefix, logs the rest


@dataclass
class Counts:
    """Tokens from one run. ``useful`` is what the requests asked for and got;
    ``computed`` also counts what a static batch generated past a request's own
    length (padding waste), so the two differ only for padded batches."""

    useful: int
    computed: int


@dataclass
class Case:
    """One measured setting of one workload on one engine (e.g. transformers'
    64x128 as one batch of 64, or as batches of 16: ``64x128/b16``)."""

    name: str
    setup: str
    workload: Workload
    run: Callable[[], Counts]


CasesFor = Callable[[Workload], list[Case]]
Loader = Callable[[argparse.Namespace], CasesFor]


class _Completion(Protocol):
    token_ids: Sequence[int]


class _RequestOutput(Protocol):
    outputs: Sequence[_Completion]


def count_outputs(outputs: Sequence[_RequestOutput], workload: Workload) -> Counts:
    """Count a vLLM-style ``generate`` result (vLLM and tokenmill share the shape).

    Tokens past what a request asked for are not useful, and a request that came
    back short shows up as ``useful`` below the workload's expected total.
    """
    assert len(outputs) == workload.num_requests, (len(outputs), workload.num_requests)
    lengths = [len(out.outputs[0].token_ids) for out in outputs]
    useful = sum(min(n, asked) for n, asked in zip(lengths, workload.max_tokens, strict=True))
    return Counts(useful=useful, computed=sum(lengths))


def progress(engine: str, message: str) -> None:
    print(f"{PROGRESS} {engine}: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="One engine's offline throughput worker.")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    p.add_argument("--workloads", default=",".join(WORKLOAD_NAMES), help="comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (default 3)")
    p.add_argument("--quick", action="store_true", help="small workloads (smoke test)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch limit (default 64)")
    p.add_argument(
        "--t0",
        type=float,
        default=None,
        help="time.time() when the parent spawned us (default: now)",
    )
    return p.parse_args(argv)


def worker_main(engine: str, load: Loader, dists: Sequence[str]) -> None:
    """Load the engine, measure every case of every workload, write JSON."""
    args = parse_args()
    t0 = time.time() if args.t0 is None else args.t0
    result: dict[str, Any] = {"engine": engine, "versions": versions(dists)}
    try:
        cases_for = load(args)
    except ImportError as exc:
        result["skipped"] = f"cannot import {engine}: {exc}"
        _write(args.out, result)
        progress(engine, f"skipped ({result['skipped']})")
        return
    result["startup_s"] = round(time.time() - t0, 2)
    result["cases"] = {}
    progress(engine, f"ready after {result['startup_s']:.1f} s")
    for name in args.workloads.split(","):
        workload = make_workload(name, quick=args.quick)
        for case in cases_for(workload):
            result["cases"][case.name] = _measure(engine, case, args.repeats)
            result["peak_rss_mb"] = peak_rss_mb()
            _write(args.out, result)
    result["peak_rss_mb"] = peak_rss_mb()
    _write(args.out, result)


def _measure(engine: str, case: Case, repeats: int) -> dict[str, Any]:
    """Warm up once, then time ``repeats`` runs; an engine error is recorded for
    this case and the worker moves on (an engine under construction may fail
    one workload and still have figures for the others)."""
    wl = case.workload
    entry: dict[str, Any] = {
        "workload": wl.name,
        "description": wl.description,
        "setup": case.setup,
        "requests": wl.num_requests,
        "prompt_tokens": wl.prompt_tokens,
        "expected_tokens": wl.output_tokens,
    }
    try:
        progress(engine, f"{case.name}: warm-up")
        case.run()
        times, counts, others = [], Counts(0, 0), []
        for i in range(repeats):
            other0, start = other_cpu_s(), time.perf_counter()
            counts = case.run()
            times.append(time.perf_counter() - start)
            others.append((other_cpu_s() - other0) / times[-1])
            progress(
                engine,
                f"{case.name}: run {i + 1}/{repeats} {counts.useful / times[-1]:.1f} tok/s"
                f" (other processes: {max(0.0, others[-1]):.2f} cores)",
            )
    except Exception as exc:
        traceback.print_exc()
        entry["error"] = f"{type(exc).__name__}: {exc}"
        progress(engine, f"{case.name}: failed ({entry['error']})")
        return entry
    runs = [counts.useful / t for t in times]
    entry.update(
        useful_tokens=counts.useful,
        computed_tokens=counts.computed,
        times_s=[round(t, 3) for t in times],
        tok_s_runs=[round(r, 1) for r in runs],
        tok_s=round(statistics.median(runs), 1),
        other_load_cores=round(max(0.0, max(others)), 2),
    )
    if counts.useful != wl.output_tokens:
        entry["warning"] = f"got {counts.useful} useful tokens, expected {wl.output_tokens}"
    return entry


def busy_cpu_s() -> float:
    """CPU-seconds every process on the machine has used since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def other_cpu_s() -> float:
    """CPU-seconds used by processes outside this worker's tree.

    On a shared two-core machine another job's threads make torch's OpenMP
    threads spin against each other and throughput drops several-fold, not by
    the share taken; each timed run records this so a figure measured under
    contention is marked as such rather than taken for the engine's.
    """
    ticks = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime, stime, and for reaped children cutime, cstime (man 5 proc).
        ticks += sum(int(f) for f in fields[11:15])
    return busy_cpu_s() - ticks / CLOCK_TICKS


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its live descendants.

    vLLM runs its engine core in a child process (and inductor keeps compile
    workers), so the worker's own ``ru_maxrss`` would miss most of vLLM. Each
    descendant's own peak (``VmHWM``) is added; the sum can only overstate the
    tree's true simultaneous peak, never understate it.
    """
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = sum(_vm_hwm_kib(pid) for pid in _descendants(os.getpid())) / 1024
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    children = max(children, reaped)
    return {
        "self": round(own, 1),
        "children": round(children, 1),
        "total": round(own + children, 1),
    }


def _descendants(root: int) -> list[int]:
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces; fields resume after its ')'.
        parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parent_of.items() if p == pid]
        found += kids
        frontier += kids
    return found


def _vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def versions(dists: Sequence[str]) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
