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
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tokenmill.cli.bench_plan import Plan, Refused, ServerGone, Stopped, run_info
from tokenmill.cli.bench_progress import unless_stopped, with_progress

if TYPE_CHECKING:  # the bench modules load with the command that needs them, not with every CLI call
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.metrics import Summary
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource

err = Console(stderr=True)
out = Console()
app = typer.Typer(help="Measure serving: TTFT, ITL, throughput, goodput, cost.", no_args_is_help=True)


@app.command()
def run(
    url: Annotated[str, typer.Argument(help="The server's base URL, e.g. http://127.0.0.1:8000 (no /v1).")],
    profile: Annotated[
        str | None,
        typer.Option(
            help="concurrency, constant, poisson, gamma or trace. "
            "Default: concurrency (trace with --trace, poisson with --find-max-goodput)."
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(help="Requests in flight (concurrency profile; default 8); a list 1,4,16 sweeps."),
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Requests/s (constant, poisson, gamma); a list 1,2,4 sweeps.")
    ] = None,
    find_max_goodput: Annotated[
        bool,
        typer.Option(help="Search the highest rate of --profile (poisson, constant, gamma) meeting --slo."),
    ] = False,
    goodput_target: Annotated[
        float | None,
        typer.Option(help="--find-max-goodput: share of requests that must meet every SLO (default 0.9)."),
    ] = None,
    burstiness: Annotated[
        float | None, typer.Option(help="Gamma shape: 1 is Poisson, lower is burstier (default 1).")
    ] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Open loop: most requests in flight.")] = None,
    trace: Annotated[
        Path | None, typer.Option(help="JSONL of timestamp (s), input_tokens, output_tokens.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests to send.", min=1)] = 100,
    duration: Annotated[
        float | None, typer.Option(help="Stop sending after this many seconds (> 0).")
    ] = None,
    endpoint: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    model: Annotated[str | None, typer.Option(help="Model name. Default: the first at /v1/models.")] = None,
    data: Annotated[
        str, typer.Option(help="synthetic, shared-prefix, multi-turn, jsonl or sharegpt.")
    ] = "synthetic",
    turns: Annotated[
        int | None, typer.Option(help="multi-turn: turns per session, default 3 (--requests counts turns).")
    ] = None,
    think_time: Annotated[
        float | None, typer.Option(help="multi-turn: seconds from a reply to the next turn (default 0).")
    ] = None,
    data_file: Annotated[Path | None, typer.Option(help="The file for --data jsonl or sharegpt.")] = None,
    prompt_tokens: Annotated[
        str | None, typer.Option(help="Prompt tokens: N or lo:hi (synthetic suffix; default 512).")
    ] = None,
    output_tokens: Annotated[str, typer.Option(help="Output tokens: N or lo:hi.")] = "128",
    prefix_groups: Annotated[int, typer.Option(help="shared-prefix: number of distinct prefixes.")] = 4,
    prefix_tokens: Annotated[
        str, typer.Option(help="shared-prefix: tokens of each prefix, N or lo:hi (drawn per prefix).")
    ] = "512",
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json (or its folder). Default: the server's /tokenize.")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly the output tokens (ignore_eos).")] = True,
    stream: Annotated[
        bool, typer.Option(help="Streamed responses (SSE); --no-stream: whole ones, TTFT = end-to-end.")
    ] = True,
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
    gpus: Annotated[
        int | None,
        typer.Option(help="GPUs behind the endpoint, with --gpu-cost-per-hour (default 1).", min=1),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Sent as Authorization: Bearer KEY.", envvar=["TOKENMILL_API_KEY", "OPENAI_API_KEY"]
        ),
    ] = None,
    metrics_url: Annotated[
        list[str] | None,
        typer.Option(help="The server's Prometheus /metrics, sampled during the run (repeatable)."),
    ] = None,
    check_tokens: Annotated[
        int, typer.Option(help="Re-tokenize this many replies to check the server's token counts (0: none).")
    ] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the data and the schedule.")] = 0,
    read_timeout: Annotated[float, typer.Option(help="Longest silence within a response (s).")] = 300.0,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File prefix for .events.jsonl, .json, .csv and .html."),
    ] = None,
) -> None:
    """Run one load against URL and report latency, throughput, goodput and cost."""
    from tokenmill.bench.data import Length
    from tokenmill.bench.load import read_trace
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.options import LoadOptions, check_run_options
    from tokenmill.bench.report import Cost
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource

    try:
        check_run_options(
            search=find_max_goodput,
            goodput_target=goodput_target,
            slo=slo,
            gpus=gpus,
            gpu_cost_per_hour=gpu_cost_per_hour,
            duration=duration,
            stream=stream,
            continuous_usage=continuous_usage,
            data=data,
            turns=turns,
            think_time=think_time,
            check_tokens=check_tokens,
            max_lag_p99=max_lag_p99,
            read_timeout=read_timeout,
            temperature=temperature,
        )
        load = LoadOptions(
            profile, concurrency, rate, burstiness, max_concurrency, find_max_goodput, trace is not None
        )
        profiles = load.profiles()
        try:
            trace_rows = read_trace(str(trace)) if trace else None
        except OSError as e:
            raise ValueError(f"--trace {trace}: {e.strerror or e}") from None
        settings = RunSettings(
            url.rstrip("/").removesuffix("/v1"),
            profiles[0],
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
            think_time=think_time or 0.0,
            stream=stream,
        )
        if prompt_tokens is not None and data in ("jsonl", "sharegpt"):
            raise ValueError(f"--prompt-tokens sets generated prompts; --data {data} sends the file's own")
        source = DataSource(
            data,
            Length.parse("512" if prompt_tokens is None else prompt_tokens, "--prompt-tokens"),
            Length.parse(output_tokens, "--output-tokens"),
            file=data_file,
            tokenizer=tokenizer,
            groups=prefix_groups,
            prefix_tokens=Length.parse(prefix_tokens, "--prefix-tokens"),
            trace=trace_rows,
            turns=3 if turns is None else turns,
        )
        if metrics_url:
            from tokenmill.bench.scrape import MetricsScraper

            MetricsScraper(metrics_url)  # checks the URLs now
        plan = Plan(
            profiles,
            find_max_goodput,
            goodput_target if goodput_target is not None else 0.9,
            SLO.parse(slo) if slo else None,
            max_lag_p99,
            Cost(gpu_cost_per_hour, gpus or 1) if gpu_cost_per_hour is not None else None,
            metrics_url or [],
            check_tokens,
        )
        if output is not None:
            from tokenmill.bench.outputs import check_prefix

            check_prefix(output, numbered=find_max_goodput or len(profiles) > 1)
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    n = min(requests, len(trace_rows)) if trace_rows else requests
    raise typer.Exit(asyncio.run(_run(settings, source, n, plan, output)))


async def _run(settings: RunSettings, source: DataSource, n: int, plan: Plan, output: Path | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C: stop, then report what was measured. The handler stays until the files are
    # written: a Ctrl-C then must not cut them short (it only makes the exit code 130).
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        return await _measure(settings, source, n, plan, output, stop)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def _measure(
    settings: RunSettings, source: DataSource, n: int, plan: Plan, output: Path | None, stop: asyncio.Event
) -> int:
    from tokenmill.bench.metrics import summarize
    from tokenmill.bench.report import print_summary, print_sweep
    from tokenmill.bench.runner import LoadRunner
    from tokenmill.bench.scrape import MetricsScraper
    from tokenmill.bench.specs import build_specs, check_endpoint, retokenize
    from tokenmill.bench.sweep import VERDICTS, GoodputSearch, find_max_goodput, goodput_verdict
    from tokenmill.client import TransportError

    runner = LoadRunner(settings)
    points: list[tuple[dict[str, Any], Any, list[Any]]] = []
    found: GoodputSearch | None = None
    gone: str | None = None  # why the server is taken to have gone away
    async with runner.transport(plan.profiles) as http:
        try:
            await runner.resolve_model(http)
            source.check_context(await runner.max_model_len(http))
            first = n if source.kind == "jsonl" else 1  # a file is cheap to read whole: check it all
            check_endpoint(
                await build_specs(http, runner.model or "", source, first, settings.seed),
                settings.endpoint,
            )
        except (TransportError, ValueError) as e:
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            return 2

        async def measure(i: int, profile: LoadProfile) -> Summary:
            if stop.is_set():
                raise Stopped()
            try:
                with err.status(f"building requests for {profile.label}..."):
                    built = build_specs(http, runner.model or "", source, n, settings.seed + i)
                    specs = await unless_stopped(built, stop)
            except TransportError as e:
                raise ServerGone(f"building the requests of {profile.label} failed: {e}") from None
            if specs is None:  # Ctrl-C before anything was sent: no point to report
                raise Stopped()
            point_runner = LoadRunner(replace(settings, profile=profile))
            point_runner.model = runner.model
            point_runner.keep_replies = plan.check_tokens
            scraper = MetricsScraper(plan.metrics_urls) if plan.metrics_urls else None
            if scraper is not None:
                scraper.start(time.perf_counter())
            try:
                records = await with_progress(point_runner, specs, stop, http, profile.label, err)
            finally:
                if scraper is not None:
                    await scraper.stop()
            info = run_info(settings, runner.model, profile, source, len(specs), stop.is_set())
            if plan.cost is not None:  # in the log's header too, for bench report
                info["cost"] = asdict(plan.cost)
            if not stop.is_set():
                replies = point_runner.replies
                note = await retokenize(http, runner.model or "", source, replies, records)
                info["notes"] = [note] if note else []
            if len(specs) < n:  # a data file holds fewer requests than --requests asked for
                info.setdefault("notes", []).append(
                    f"{source.file} holds {len(specs)} requests: {len(specs)} sent, not the {n} asked for"
                )
            summary = summarize(records, plan.slo, plan.max_lag)
            lost = await runner.unreachable() if summary.errors.get("connect") else None
            if lost:
                info.setdefault("notes", []).append(f"the server stopped answering during this run: {lost}")
            if scraper is not None:
                info["server_metrics"] = {
                    "summary": scraper.summary(),
                    "errors": scraper.errors,
                    "samples": [asdict(sample) for sample in scraper.samples],
                }
            points.append(({**info, "load": profile}, summary, records))  # kept, whatever printing does
            print_summary(out, info, summary, plan.cost)
            if lost:
                raise ServerGone(lost)
            if summary.succeeded == 0 and set(summary.errors) == {"http_4xx"}:
                raise Refused()  # no other load or rate would change the server's mind
            return summary

        async def probe(i: int, profile: LoadProfile) -> Summary:
            summary = await measure(i, profile)
            verdict = goodput_verdict(summary, plan.target)
            points[-1][0]["search_probe"] = verdict
            out.print(f"[bold]probe {profile.label}:[/bold] {VERDICTS[verdict]}", highlight=False)
            return summary

        try:
            if plan.search:
                found = await find_max_goodput(probe, plan.profiles[0], plan.target)
                if found.best is not None and found.bounded:
                    points[found.probes.index(found.best)][0]["search_probe"] = "best"
                answer = found.verdict()
                out.print(f"[bold]max goodput rate[/bold] ({plan.slo}, {plan.target:.0%} good): {answer}")
            else:
                for i, profile in enumerate(plan.profiles):
                    await measure(i, profile)
        except (Stopped, Refused):
            pass
        except ServerGone as e:
            gone = str(e)
    if len(points) > 1:
        print_sweep(out, [(info["profile"], summary) for info, summary, _ in points], plan.cost)
    if output is not None and points:
        from tokenmill.bench.outputs import sweep_axis, write_files

        search = None if found is None else {"slo": str(plan.slo), "target": plan.target, **found.to_json()}
        numbered = plan.search or len(plan.profiles) > 1
        err.print(escape(write_files(output, points, plan.cost, sweep_axis(points), search, numbered)))
    if gone is not None:
        what = f"{len(points)} probes" if plan.search else f"{len(points)} of {len(plan.profiles)} points"
        what = "the run" if len(plan.profiles) == 1 and not plan.search else what
        err.print(f"[red]the server went away ({escape(gone)}); the report covers {what}[/red]")
        return 1
    failed = [
        (info["profile"], s) for info, s, _ in points if s.succeeded == 0 and set(s.errors) - {"cancelled"}
    ]
    for label, s in failed:
        why = "; ".join(f"{kind}: {sample}" for kind, sample in sorted(s.error_samples.items()))
        err.print(f"[red]no request succeeded ({label}): {escape(why)}[/red]", highlight=False)
    if stop.is_set():
        said = "the report covers what was measured" if points else "nothing was sent, no file written"
        err.print(f"[yellow]stopped early: {said}[/yellow]")
        return 130
    if failed:  # a run that measured nothing is no measurement, whatever else it says
        return 1
    if found is not None:  # an invalid probe is part of searching: only a search without an answer fails
        return 0 if found.bounded else 1
    return 0 if all(summary.valid for _, summary, _ in points) else 1
