"""``tokenmill batch run``: an OpenAI Batch-format file through the paced client, resumable.

tokenmill batch run input.jsonl --url http://127.0.0.1:8000
tokenmill batch run input.jsonl --url http://w1:8000 --url http://w2:8000 --mode latency --priority -1
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from tokenmill.client.async_client import AsyncClient
    from tokenmill.client.batch import BatchJob, BatchSummary

err = Console(stderr=True)
app = typer.Typer(help="Run OpenAI Batch-format jobs against any OpenAI-compatible endpoints.")

MODES = {"throughput": 1.0, "latency": 0.7}  # share of the found capacity kept in flight


@app.command()
def run(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="JSONL: custom_id, method, url, body per line.")
    ],
    url: Annotated[
        list[str], typer.Option("--url", help="Endpoint base URL (repeatable: requests spread by load).")
    ] = ["http://127.0.0.1:8000"],  # noqa: B006 (typer reads the default)
    output: Annotated[
        Path | None, typer.Option(help="Results file. Default: INPUT with .output.jsonl.")
    ] = None,
    errors: Annotated[
        Path | None, typer.Option(help="Errors file. Default: INPUT with .errors.jsonl.")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="throughput: keep the workers full; latency: keep 70% of their capacity busy, "
            "leaving room for interactive traffic."
        ),
    ] = "throughput",
    max_concurrency: Annotated[
        str, typer.Option(help="auto (found from time to first token) or a fixed number in flight.")
    ] = "auto",
    requests_per_minute: Annotated[float | None, typer.Option(help="Request quota.")] = None,
    tokens_per_minute: Annotated[
        float | None, typer.Option(help="Token quota (prompt + max_tokens).")
    ] = None,
    no_burst: Annotated[
        bool, typer.Option("--no-burst", help="Space requests evenly within the quotas.")
    ] = False,
    priority: Annotated[
        int | None,
        typer.Option(
            help="Priority of every request (tokenmill workers: higher first; -1 yields to others)."
        ),
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key. Default: $TOKENMILL_API_KEY.")] = None,
    max_retries: Annotated[
        int, typer.Option(help="Tries after the first, on 408, 409, 429, 500, 502-504 and lost connections.")
    ] = 3,
    timeout: Annotated[float, typer.Option(help="Longest silence within a response, seconds.")] = 600.0,
) -> None:
    """Send every request of INPUT; finished custom_ids of an earlier run are not sent again."""
    from tokenmill.client.adaptive import LimitSettings
    from tokenmill.client.async_client import AsyncClient
    from tokenmill.client.batch import BatchJob
    from tokenmill.client.batch_files import check_results_file, count_lines
    from tokenmill.client.endpoints import check_url
    from tokenmill.protocol.headers import PRIORITY_MAX, PRIORITY_MIN

    if mode not in MODES:
        _fail(f"--mode={mode!r} is invalid: allowed {', '.join(MODES)}")
    concurrency: int | str = max_concurrency
    if max_concurrency != "auto":
        try:
            concurrency = int(max_concurrency)
        except ValueError:
            _fail(f"--max-concurrency={max_concurrency!r} is invalid: allowed 'auto' or an integer >= 1")
    # Checked before any work: a bad value found later would fail every line, stored as final.
    for endpoint in url:
        try:
            check_url(endpoint, "--url")
        except ValueError as e:
            _fail(str(e))
    if not (math.isfinite(timeout) and timeout > 0):
        _fail(f"--timeout={timeout!r} is invalid: allowed a number of seconds > 0")
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        _fail(
            f"--priority={priority} is invalid: allowed an integer from {PRIORITY_MIN} to {PRIORITY_MAX} "
            "(higher is more important)"
        )
    if not input_path.is_file():
        _fail(f"INPUT {input_path} does not exist or is not a file")
    total = count_lines(input_path)
    if total == 0:  # (a wrong or truncated file would otherwise "succeed" doing nothing)
        _fail(f"INPUT {input_path} holds no requests: it is empty or blank (one JSON request a line)")
    output = output or input_path.with_suffix(".output.jsonl")
    errors = errors or input_path.with_suffix(".errors.jsonl")
    for option, path in (("--output", output), ("--errors", errors)):
        try:
            check_results_file(path, option)
        except ValueError as e:
            _fail(str(e))
    if len({input_path.resolve(), output.resolve(), errors.resolve()}) < 3:
        _fail("INPUT, --output and --errors must be three different files")
    try:
        client = AsyncClient(
            url,
            api_key=api_key if api_key is not None else os.environ.get("TOKENMILL_API_KEY"),
            max_concurrency=concurrency,  # type: ignore[arg-type]
            limit=LimitSettings(headroom=MODES[mode]),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            no_burst=no_burst,
            max_retries=max_retries,
            timeout=timeout,
            priority=priority,
        )
    except ValueError as e:
        _fail(str(e))
    job = BatchJob(client, input_path, output, errors, total_lines=total)
    try:
        summary = asyncio.run(_run(job, client))
    except KeyboardInterrupt:
        p = job.progress
        kept = p.succeeded + p.skipped
        err.print(
            f"interrupted: {kept} results kept in {escape(str(output))}; run the same command to resume"
        )
        raise typer.Exit(130) from None
    before = f" ({summary.failed_before} of them failed)" if summary.failed_before else ""
    err.print(
        f"{summary.succeeded} succeeded, {summary.failed} failed, {summary.skipped} done before{before}; "
        f"{summary.completion_tokens} output tokens in {summary.seconds:.1f} s "
        f"({summary.completion_tokens / max(summary.seconds, 1e-9):.0f} tok/s)"
    )
    err.print(escape(f"results: {output}\nerrors:  {errors}"))
    if summary.stopped:
        _fail(f"stopped early: {summary.stopped}; run the same command again to resume")
    if summary.failed or summary.failed_before:  # the job as a whole, earlier runs' lines included
        raise typer.Exit(1)


async def _run(job: BatchJob, client: AsyncClient) -> BatchSummary:
    from tokenmill.client.batch import BatchProgress

    columns = (
        TextColumn("[bold]batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("batch", total=job.progress.total_lines, rate="")

        def show(p: BatchProgress) -> None:
            elapsed = max(1e-9, time.monotonic() - p.started)
            rate = (
                f"{(p.succeeded + p.failed) / elapsed:.1f} req/s {p.completion_tokens / elapsed:.0f} tok/s "
                f"in flight {p.in_flight}/{p.concurrency_limit} failed {p.failed}"
            )
            bar.update(task, completed=p.finished, rate=rate)

        try:
            return await job.run(show)
        finally:
            report = client.report()
            await client.aclose()
            if len(report.workers) > 1 or report.warnings:
                err.print(escape(report.table()), highlight=False)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(_as_options(message))}", highlight=False)
    raise typer.Exit(2)


def _as_options(message: str) -> str:
    """The client names its arguments (``max_retries=-1 is invalid``); here they are options."""
    name = re.match(r"[a-z_]+(?==| is invalid)", message)
    return f"--{name[0].replace('_', '-')}{message[name.end() :]}" if name else message
