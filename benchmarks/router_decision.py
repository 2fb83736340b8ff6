"""What one routing decision costs the router (issue 6: well under a millisecond at 32k tokens).

Parse the body, hash the prompt's chunks, pick among 8 workers under the
`prefix` policy (the costliest), for prompts of 1k to 32k tokens (~4
characters each); medians of 50 decisions each, after the index holds the
prompt on one worker.

    .venv/bin/python benchmarks/router_decision.py
"""

from __future__ import annotations

import json
import statistics
import time

from tokenmill.router.policies import Router, RouteRequest
from tokenmill.router.prefix_index import chunk_hashes, prompt_text
from tokenmill.router.workers import WorkerPool


def decision_ms(raw: bytes, router: Router, pool: WorkerPool) -> float:
    start = time.perf_counter()
    request = json.loads(raw)
    text = prompt_text(request)
    router.choose(
        RouteRequest(len(text) // 4 + 64, None, len(text) // 4, chunk_hashes(text)), pool.available()
    )
    return (time.perf_counter() - start) * 1000


def main() -> int:
    print("| prompt tokens | body KiB | decision ms median | p99 |")
    print("| ---: | ---: | ---: | ---: |")
    for tokens in (1024, 4096, 16384, 32768):
        pool = WorkerPool([f"http://127.0.0.1:{9000 + i}" for i in range(8)])
        router = Router("prefix")
        body = {"messages": [{"role": "system", "content": "word " * (tokens * 4 // 5)}], "max_tokens": 64}
        raw = json.dumps(body).encode()
        times = sorted(decision_ms(raw, router, pool) for _ in range(50))
        print(f"| {tokens} | {len(raw) / 1024:.0f} | {statistics.median(times):.3f} | {times[-1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
