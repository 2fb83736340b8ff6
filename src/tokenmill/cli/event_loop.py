"""The event loop of the long-running servers (worker and router): uvloop where it exists."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run_fast(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop where it exists (not on Windows), else on asyncio's own loop.

    Both servers are event loops that write one small message per streamed token: libuv's loop
    takes 10-20% off the router's latency and CPU per request (benchmarks/router_overhead.py) and a
    third off the worker's CPU per streamed chunk (docs/benchmarks.md, "Serving API")."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
