"""``tokenmill bench run``'s progress bar: requests done, and the TTFT percentiles so far."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None when ``stop`` (Ctrl-C) comes first and ``work`` is cancelled.

    Building thousands of long prompts through a server's /tokenize takes minutes: a Ctrl-C
    then must end it, and must not leave behind an empty run in place of an earlier one."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def with_progress(
    runner: Any, specs: list[Any], stop: asyncio.Event, http: Any, label: str, err: Console
) -> list[Any]:
    """``runner.run(specs)`` under a progress bar on ``err`` (gone when it ends); its records."""
    import numpy as np

    ttfts: list[float] = []
    shown = [0.0]  # when the status line was last recomputed
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with Progress(TextColumn("{task.description}"), *columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=len(specs), status="")

        def seen(record: Any) -> None:
            if record.first_token is not None and record.anchor is not None:
                ttfts.append(record.first_token - record.anchor)
            now = time.perf_counter()
            if now - shown[0] < 0.25:  # the client's CPU belongs to the load: a few times a second
                bar.advance(task)
                return
            shown[0] = now
            elapsed = max(now - runner.started, 1e-9)
            done = bar.tasks[0].completed + 1
            p50, p99 = np.percentile(ttfts, [50, 99]) * 1000 if ttfts else (float("nan"), float("nan"))
            status = f"{done / elapsed:.1f} req/s, TTFT p50 {p50:.0f} ms, p99 {p99:.0f} ms"
            bar.update(task, advance=1, status=status)

        return await runner.run(specs, on_record=seen, stop=stop, http=http)
