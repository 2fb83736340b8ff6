"""``tokenmill bench``: measure any OpenAI-compatible server, and a mock server to calibrate against.

tokenmill bench run http://127.0.0.1:8000 --profile concurrency --concurrency 8 --requests 200
tokenmill bench run URL --profile poisson --rate 4 --slo ttft=0.3,tpot=0.05 --gpu-cost-per-hour 2.5
tokenmill bench mock-server --ttft 0.2 --itl 0.02 --output-tokens 128
tokenmill bench report run.events.jsonl --slo ttft=0.5
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the bench modules load with the command that needs them, not with every CLI call
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.report import Cost
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource

err = Console(stderr=True)
out = Console()
app = typer.Typer(help="Measure serving: TTFT, ITL, throughput, goodput, cost.", no_args_is_help=True)


@app.command()
def run(
    url: Annotated[str, typer.Argument(help="The server's base URL, e.g. http://127.0.0.1:8000 (no /v1).")],
    profile: Annotated[
        str, typer.Option(help="concurrency, constant, poisson, gamma or trace.")
    ] = "concurrency",
    concurrency: Annotated[int, typer.Option(help="Requests in flight (concurrency profile).")] = 8,
    rate: Annotated[float | None, typer.Option(help="Requests/s (constant, poisson, gamma).")] = None,
    burstiness: Annotated[float, typer.Option(help="Gamma shape: 1 is Poisson, lower is burstier.")] = 1.0,
    max_concurrency: Annotated[int | None, typer.Option(help="Open loop: most requests in flight.")] = None,
    trace: Annotated[
        Path | None, typer.Option(help="JSONL of timestamp (s), input_tokens, output_tokens.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests to send.", min=1)] = 100,
    duration: Annotated[float | None, typer.Option(help="Stop sending after this many seconds.")] = None,
    endpoint: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    model: Annotated[str | None, typer.Option(help="Model name. Default: the first at /v1/models.")] = None,
    data: Annotated[str, typer.Option(help="synthetic, shared-prefix, jsonl or sharegpt.")] = "synthetic",
    data_file: Annotated[Path | None, typer.Option(help="The file for --data jsonl or sharegpt.")] = None,
    prompt_tokens: Annotated[str, typer.Option(help="Prompt tokens: N or lo:hi (synthetic suffix).")] = "512",
    output_tokens: Annotated[str, typer.Option(help="Output tokens: N or lo:hi.")] = "128",
    prefix_groups: Annotated[int, typer.Option(help="shared-prefix: number of distinct prefixes.")] = 4,
    prefix_tokens: Annotated[int, typer.Option(help="shared-prefix: tokens of each prefix.")] = 512,
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json (or its folder). Default: the server's /tokenize.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly the output tokens (ignore_eos).")] = True,
    continuous_usage: Annotated[
        bool, typer.Option(help="Ask for usage on every chunk (exact tokens per message).")
    ] = False,
    temperature: Annotated[
        float | None, typer.Option(help="Sampling temperature. Default: the server's.")
    ] = None,
    slo: Annotated[
        str | None, typer.Option(help="Goodput targets, e.g. ttft=0.3,tpot=0.05 (seconds).")
    ] = None,
    max_lag_p99: Annotated[
        float, typer.Option(help="A run whose schedule lag p99 passes this (s) is invalid.")
    ] = 0.010,
    gpu_cost_per_hour: Annotated[
        float | None, typer.Option(help="$ per GPU-hour, for $ per million tokens.")
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs behind the endpoint.", min=1)] = 1,
    api_key: Annotated[
        str | None, typer.Option(help="Sent as Authorization: Bearer KEY.", envvar="OPENAI_API_KEY")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the data and the schedule.")] = 0,
    read_timeout: Annotated[float, typer.Option(help="Longest silence within a response (s).")] = 300.0,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File prefix for .events.jsonl, .json and .csv.")
    ] = None,
) -> None:
    """Run one load against URL and report latency, throughput, goodput and cost."""
    from tokenmill.bench.data import Length
    from tokenmill.bench.load import LoadProfile, read_trace
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.report import Cost
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource

    try:
        trace_rows = read_trace(str(trace)) if trace else None
        prof = LoadProfile(
            "trace" if trace_rows and profile == "concurrency" else profile,
            rate=rate,
            concurrency=concurrency,
            burstiness=burstiness,
            max_concurrency=max_concurrency,
        )
        if prof.kind == "trace" and trace_rows is None:
            raise ValueError("--profile trace needs --trace FILE")
        settings = RunSettings(
            url.rstrip("/").removesuffix("/v1"),
            prof,
            endpoint=endpoint,
            model=model,
            max_tokens=Length.parse(output_tokens, "--output-tokens").hi,
            ignore_eos=ignore_eos,
            continuous_usage=continuous_usage,
            temperature=temperature,
            api_key=api_key,
            read_timeout=read_timeout,
            max_duration=duration,
            seed=seed,
            trace_times=[r["timestamp"] for r in trace_rows] if trace_rows else None,
        )
        goals = SLO.parse(slo) if slo else None
        cost = Cost(gpu_cost_per_hour, gpus) if gpu_cost_per_hour is not None else None
        source = DataSource(
            data,
            Length.parse(prompt_tokens, "--prompt-tokens"),
            Length.parse(output_tokens, "--output-tokens"),
            file=data_file,
            tokenizer=tokenizer,
            groups=prefix_groups,
            prefix_tokens=prefix_tokens,
            trace=trace_rows,
        )
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    n = min(requests, len(trace_rows)) if trace_rows else requests
    code = asyncio.run(_run(settings, source, n, goals, max_lag_p99, cost, output))
    raise typer.Exit(code)


async def _run(
    settings: RunSettings,
    source: DataSource,
    n: int,
    goals: SLO | None,
    max_lag: float,
    cost: Cost | None,
    output: Path | None,
) -> int:
    from tokenmill.bench.metrics import summarize
    from tokenmill.bench.records import write_log
    from tokenmill.bench.report import csv_row, print_summary, write_csv, write_json
    from tokenmill.bench.runner import LoadRunner
    from tokenmill.bench.specs import build_specs
    from tokenmill.client import TransportError

    runner = LoadRunner(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C: stop, then report what was measured
    try:
        async with runner.transport() as http:
            try:
                await runner.resolve_model(http)
                with err.status("building requests..."):
                    specs = await build_specs(http, runner.model or "", source, n, settings.seed)
            except (TransportError, ValueError) as e:
                err.print(f"[red]error:[/red] {e}")
                return 2
            records = await _with_progress(runner, specs, stop, http)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    summary = summarize(records, goals, max_lag)
    run_info = {
        "url": settings.url,
        "model": runner.model,
        "endpoint": settings.endpoint,
        "profile": settings.profile.label,
        "data": source.describe(),
        "requests": len(specs),
        "stopped_early": stop.is_set(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": settings.seed,
    }
    print_summary(out, run_info, summary, cost)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_log(output.with_name(output.name + ".events.jsonl"), run_info, records)
        write_json(output.with_name(output.name + ".json"), run_info, summary, cost)
        write_csv(output.with_name(output.name + ".csv"), [csv_row(run_info, summary, cost)])
        err.print(f"wrote {output}.events.jsonl, .json, .csv")
    if stop.is_set():
        err.print("[yellow]stopped early: the report covers what was measured[/yellow]")
        return 130
    return 0 if summary.valid else 1


async def _with_progress(runner: Any, specs: list[Any], stop: asyncio.Event, http: Any) -> list[Any]:
    ttfts: list[float] = []
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with Progress(TextColumn("{task.description}"), *columns, console=err, transient=True) as bar:
        task = bar.add_task("requests", total=len(specs), status="")

        def seen(record: Any) -> None:
            if record.messages and record.anchor is not None:
                ttfts.append(record.messages[0][0] - record.anchor)
            elapsed = max(time.perf_counter() - runner.started, 1e-9)
            done = bar.tasks[0].completed + 1
            median = sorted(ttfts)[len(ttfts) // 2] * 1000 if ttfts else float("nan")
            bar.update(task, advance=1, status=f"{done / elapsed:.1f} req/s, TTFT p50 {median:.0f} ms")

        return await runner.run(specs, on_record=seen, stop=stop, http=http)


@app.command()
def report(
    events: Annotated[Path, typer.Argument(help="A run's .events.jsonl.")],
    slo: Annotated[str | None, typer.Option(help="Goodput targets, e.g. ttft=0.3,tpot=0.05.")] = None,
    max_lag_p99: Annotated[
        float, typer.Option(help="Schedule lag p99 (s) past which a run is invalid.")
    ] = 0.010,
) -> None:
    """Recompute a run's report from its event log (other SLOs, say)."""
    from tokenmill.bench.metrics import SLO, summarize
    from tokenmill.bench.records import read_log
    from tokenmill.bench.report import print_summary

    try:
        header, records = read_log(events)
        goals = SLO.parse(slo) if slo else None
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    print_summary(out, header, summarize(records, goals, max_lag_p99))


@app.command("mock-server")
def mock_server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8100,
    ttft: Annotated[float, typer.Option(help="Seconds from a request's arrival to its first token.")] = 0.2,
    itl: Annotated[float, typer.Option(help="Seconds between tokens.")] = 0.02,
    output_tokens: Annotated[
        int, typer.Option(help="Tokens per response when the request gives no max_tokens.")
    ] = 128,
    model: Annotated[str, typer.Option(help="The model name it lists and answers as.")] = "mock",
    worker_id: Annotated[str | None, typer.Option(help="x-tokenmill-worker. Default: mock-PORT.")] = None,
    fail_every: Annotated[int, typer.Option(help="Answer every Nth request with a 500 (0: never).")] = 0,
    cut_every: Annotated[int, typer.Option(help="Cut every Nth stream halfway (0: never).")] = 0,
) -> None:
    """An OpenAI-compatible server with exact timings (TTFT, ITL, length)."""
    from tokenmill.bench.mock_server import MockConfig, MockServer

    try:
        config = MockConfig(ttft, itl, output_tokens, model, worker_id, fail_every, cut_every)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None

    async def serve() -> None:
        server = MockServer(config)
        await server.start(host, port)
        err.print(f"mock server ready: {server.url}/v1; ttft {ttft:g} s, itl {itl:g} s", highlight=False)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as e:
        err.print(f"[red]error:[/red] cannot listen on {host}:{port}: {e.strerror or e}")
        raise typer.Exit(1) from None
