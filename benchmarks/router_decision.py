"""What one routing decision costs the router (issue 6: well under a millisecond at 32k tokens).

`prefix`: parse the body, hash the prompt's text chunks, pick among 8 workers,
after the index holds the prompt on one worker. `kv`: parse the body, render
the chat template, tokenize, hash the blocks, match them against 8 workers'
KV events (one holds the system prompt), pick; "warm" is a known system
prompt with a new user message each time (the system prompt's tokens and
hashes come from the memo), "cold" a system prompt never seen (routed by its
text chunks at once while it is tokenized in the background, as the router
does). Prompts are random words from the bench vocabulary,
tokenized by the demo tokenizer; medians of 50 decisions (10 cold).

    .venv/bin/python benchmarks/router_decision.py
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import tokenmill.engine.tokenizer as tokenizer_module
from tokenmill.bench.vocabulary import WORDS
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.router.policies import Router, RouteRequest
from tokenmill.router.prefix_index import chunk_hashes, prompt_text
from tokenmill.router.prompt_blocks import PromptHasher
from tokenmill.router.workers import WorkerPool

SIZES = (1024, 4096, 16384, 32768)
TOKENIZER = Tokenizer(Path(tokenizer_module.__file__).parent / "demo_model")


def text_of(tokens: int, rng: random.Random) -> str:
    words: list[str] = []
    while len(TOKENIZER.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words += [rng.choice(WORDS) for _ in range(max(16, (tokens - len(words)) // 2))]
    return " ".join(words)


def body(system: str, question: str) -> bytes:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return json.dumps({"messages": messages, "max_tokens": 64}).encode()


def prefix_ms(raw: bytes, router: Router, pool: WorkerPool) -> float:
    start = time.perf_counter()
    request = json.loads(raw)
    text = prompt_text(request)
    route = RouteRequest(len(text) // 4 + 64, None, len(text) // 4, chunk_hashes(text))
    router.choose(route, pool.available())
    return (time.perf_counter() - start) * 1000


async def kv_ms(raw: bytes, router: Router, pool: WorkerPool, hasher: PromptHasher) -> float:
    """As RouterApp decides: exact blocks when the memo holds the long part of the prompt, else
    text chunks now and tokenizing in the background."""
    start = time.perf_counter()
    request = json.loads(raw)
    blocks = await hasher.blocks(request, 16, wait=False)
    if blocks is not None:
        route = RouteRequest(blocks.num_tokens + 64, None, blocks.num_tokens, blocks=blocks)
    else:
        text = prompt_text(request)
        route = RouteRequest(len(text) // 4 + 64, None, len(text) // 4, chunk_hashes(text))
    router.choose(route, pool.available())
    return (time.perf_counter() - start) * 1000


async def main() -> int:
    rng = random.Random(0)
    print("| prompt tokens | body KiB | prefix ms p50 / p99 | kv warm ms p50 / p99 | kv cold ms p50 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for tokens in SIZES:
        system = text_of(tokens, rng)
        questions = [text_of(30, rng) for _ in range(50)]
        pool = WorkerPool([f"http://127.0.0.1:{9000 + i}" for i in range(8)])
        prefix, kv = Router("prefix"), Router("kv")
        hasher = PromptHasher(TOKENIZER)
        first = await hasher.blocks(json.loads(body(system, questions[0])), 16)
        assert first is not None
        kv.kv.apply(pool.workers[3].url, {"type": "BlockStored", "block_hashes": first.hashes})
        prefix.prefixes.record(pool.workers[3].url, chunk_hashes(prompt_text(json.loads(body(system, "")))))
        p = sorted(prefix_ms(body(system, q), prefix, pool) for q in questions)
        warm = sorted([await kv_ms(body(system, q), kv, pool, hasher) for q in questions])
        cold = []
        for q in questions[:10]:
            cold.append(await kv_ms(body(text_of(tokens, rng), q), kv, pool, hasher))
            await asyncio.gather(*hasher._warming.values())  # let the background work finish
        size = len(body(system, questions[0])) / 1024
        print(
            f"| {first.num_tokens} | {size:.0f} | {statistics.median(p):.3f} / {p[-1]:.3f} | "
            f"{statistics.median(warm):.3f} / {warm[-1]:.3f} | {statistics.median(cold):.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
