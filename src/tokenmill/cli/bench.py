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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # the bench modules load with the command that needs them, not with every CLI call
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.metrics import SLO, Summary
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
    concurrency: Annotated[
        str | None,
        typer.Option(help="Requests in flight (concurrency profile; default 8); a list 1,4,16 sweeps."),
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Requests/s (constant, poisson, gamma); a list 1,2,4 sweeps.")
    ] = None,
    find_max_goodput: Annotated[
        bool, typer.Option(help="Search the highest Poisson rate meeting --slo (from --rate, default 1).")
    ] = False,
    goodput_target: Annotated[
        float, typer.Option(help="Share of requests that must meet every SLO, for --find-max-goodput.")
    ] = 0.9,
    burstiness: Annotated[
        float | None, typer.Option(help="Gamma shape: 1 is Poisson, lower is burstier (default 1).")
    ] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Open loop: most requests in flight.")] = None,
    trace: Annotated[
        Path | None, typer.Option(help="JSONL of timestamp (s), input_tokens, output_tokens.")
    ] = None,
    requests: Annotated[int, typer.Option(help="Requests to send.", min=1)] = 100,
    duration: Annotated[float | None, typer.Option(help="Stop sending after this many seconds.")] = None,
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
    prompt_tokens: Annotated[str, typer.Option(help="Prompt tokens: N or lo:hi (synthetic suffix).")] = "512",
    output_tokens: Annotated[str, typer.Option(help="Output tokens: N or lo:hi.")] = "128",
    prefix_groups: Annotated[int, typer.Option(help="shared-prefix: number of distinct prefixes.")] = 4,
    prefix_tokens: Annotated[int, typer.Option(help="shared-prefix: tokens of each prefix.")] = 512,
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
    gpus: Annotated[int, typer.Option(help="GPUs behind the endpoint.", min=1)] = 1,
    api_key: Annotated[
        str | None, typer.Option(help="Sent as Authorization: Bearer KEY.", envvar="OPENAI_API_KEY")
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
        Path | None, typer.Option("--output", "-o", help="File prefix for .events.jsonl, .json and .csv.")
    ] = None,
) -> None:
    """Run one load against URL and report latency, throughput, goodput and cost."""
    from tokenmill.bench.data import Length
    from tokenmill.bench.load import read_trace
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.report import Cost
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.specs import DataSource

    try:
        trace_rows = read_trace(str(trace)) if trace else None
        kind = "trace" if trace_rows and profile == "concurrency" else profile
        _check_combinations(kind, concurrency, rate, burstiness, max_concurrency, find_max_goodput)
        if continuous_usage and not stream:
            raise ValueError("--continuous-usage asks for usage on every chunk: it needs --stream")
        if data != "multi-turn" and (turns is not None or think_time is not None):
            raise ValueError("--turns and --think-time go with --data multi-turn")
        profiles = _profiles(
            kind, concurrency or "8", rate, burstiness or 1.0, max_concurrency, find_max_goodput
        )
        if kind == "trace" and trace_rows is None:
            raise ValueError("--profile trace needs --trace FILE")
        if find_max_goodput and not slo:
            raise ValueError("--find-max-goodput needs --slo, e.g. --slo ttft=0.3,tpot=0.05")
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
            turns=turns or 3,
        )
        if metrics_url:
            from tokenmill.bench.scrape import MetricsScraper

            MetricsScraper(metrics_url)  # checks the URLs now
        if check_tokens < 0:
            raise ValueError(f"--check-tokens must be >= 0, got {check_tokens}")
        plan = Plan(
            profiles,
            find_max_goodput,
            goodput_target,
            goals,
            max_lag_p99,
            cost,
            metrics_url or [],
            check_tokens,
        )
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    n = min(requests, len(trace_rows)) if trace_rows else requests
    raise typer.Exit(asyncio.run(_run(settings, source, n, plan, output)))


def _check_combinations(
    kind: str,
    concurrency: str | None,
    rate: str | None,
    burstiness: float | None,
    cap: int | None,
    search: bool,
) -> None:
    """Options that the chosen profile would ignore are errors, not silent no-ops."""
    if search:
        if concurrency is not None:
            raise ValueError("--find-max-goodput searches request rates: drop --concurrency")
        return
    if kind == "concurrency" and rate is not None:
        raise ValueError("--rate goes with --profile constant, poisson or gamma, not concurrency")
    if kind == "concurrency" and cap is not None:
        raise ValueError("--max-concurrency caps an open loop; with --profile concurrency use --concurrency")
    if kind != "concurrency" and concurrency is not None:
        raise ValueError(
            f"--concurrency goes with --profile concurrency; to cap {kind} use --max-concurrency"
        )
    if kind == "trace" and rate is not None:
        raise ValueError("--rate does not apply to --profile trace: the trace gives the times")
    if kind != "gamma" and burstiness is not None:
        raise ValueError("--burstiness goes with --profile gamma")


def _profiles(
    kind: str, concurrency: str, rate: str | None, burstiness: float, cap: int | None, search: bool
) -> list[LoadProfile]:
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.sweep import parse_values

    if search:  # the search makes its own Poisson profiles; this one only checks the start
        start = parse_values(rate, "--rate")[0] if rate else 1.0
        return [LoadProfile("poisson", rate=start, max_concurrency=cap)]
    if kind == "concurrency":
        return [
            LoadProfile(kind, concurrency=int(c)) for c in parse_values(concurrency, "--concurrency", int)
        ]
    if kind == "trace":
        return [LoadProfile(kind, max_concurrency=cap)]
    rates = parse_values(rate, "--rate") if rate else [None]
    return [LoadProfile(kind, rate=r, burstiness=burstiness, max_concurrency=cap) for r in rates]


@dataclass(frozen=True)
class Plan:
    """What to run and how to judge it."""

    profiles: list[LoadProfile]  # one: a run; several: a sweep
    search: bool  # --find-max-goodput
    target: float
    slo: SLO | None
    max_lag: float
    cost: Cost | None
    metrics_urls: list[str]
    check_tokens: int  # replies re-tokenized per point


async def _run(settings: RunSettings, source: DataSource, n: int, plan: Plan, output: Path | None) -> int:
    from tokenmill.bench.metrics import summarize
    from tokenmill.bench.report import print_summary, print_sweep
    from tokenmill.bench.runner import LoadRunner
    from tokenmill.bench.scrape import MetricsScraper
    from tokenmill.bench.specs import build_specs, retokenize
    from tokenmill.bench.sweep import find_max_goodput
    from tokenmill.client import TransportError

    runner = LoadRunner(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C: stop, then report what was measured
    points: list[tuple[dict[str, Any], Any, list[Any]]] = []
    try:
        async with runner.transport(plan.profiles) as http:
            try:
                await runner.resolve_model(http)
                await build_specs(http, runner.model or "", source, 1, settings.seed)  # fail fast on bad data
            except (TransportError, ValueError) as e:
                err.print(f"[red]error:[/red] {e}")
                return 2

            async def measure(i: int, profile: LoadProfile) -> Summary:
                if stop.is_set():
                    raise _Stopped()
                with err.status(f"building requests for {profile.label}..."):
                    specs = await build_specs(http, runner.model or "", source, n, settings.seed + i)
                point_runner = LoadRunner(replace(settings, profile=profile))
                point_runner.model = runner.model
                point_runner.keep_replies = plan.check_tokens
                scraper = MetricsScraper(plan.metrics_urls) if plan.metrics_urls else None
                if scraper is not None:
                    scraper.start(time.perf_counter())
                try:
                    records = await _with_progress(point_runner, specs, stop, http, profile.label)
                finally:
                    if scraper is not None:
                        await scraper.stop()
                if not stop.is_set():
                    await retokenize(http, runner.model or "", source, point_runner.replies, records)
                summary = summarize(records, plan.slo, plan.max_lag)
                info = _info(settings, runner.model, profile, source, len(specs), stop.is_set())
                if scraper is not None:
                    info["server_metrics"] = {
                        "summary": scraper.summary(),
                        "errors": scraper.errors,
                        "samples": [asdict(sample) for sample in scraper.samples],
                    }
                print_summary(out, info, summary, plan.cost)
                points.append(({**info, "load": profile}, summary, records))
                return summary

            try:
                if plan.search:
                    start = plan.profiles[0].rate or 1.0
                    found = await find_max_goodput(measure, start, plan.target)
                    rate = (
                        f"{found.max_rate:.3g} req/s"
                        if found.max_rate is not None
                        else "none of the rates tried"
                    )
                    out.print(f"[bold]max goodput rate[/bold] ({plan.slo}, {plan.target:.0%} good): {rate}")
                else:
                    for i, profile in enumerate(plan.profiles):
                        await measure(i, profile)
            except _Stopped:
                pass
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if len(points) > 1:
        print_sweep(out, [(info["profile"], summary) for info, summary, _ in points], plan.cost)
    if output is not None and points:
        _write(output, points, plan.cost, _sweep_axis(points))
    if stop.is_set():
        err.print("[yellow]stopped early: the report covers what was measured[/yellow]")
        return 130
    return 0 if all(summary.valid for _, summary, _ in points) else 1


class _Stopped(Exception):
    """Ctrl-C between the points of a sweep."""


def _info(
    settings: RunSettings, model: str | None, profile: LoadProfile, source: DataSource, n: int, stopped: bool
) -> dict[str, Any]:
    return {
        "url": settings.url,
        "model": model,
        "endpoint": settings.endpoint,
        "profile": profile.label,
        "data": source.describe(),
        "requests": n,
        "stopped_early": stopped,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": settings.seed,
    }


def _sweep_axis(points: list[tuple[dict[str, Any], Any, list[Any]]]) -> tuple[str, list[float]] | None:
    """What a sweep varied (concurrency or rate), read back from its points' profiles."""
    profiles = [info["load"] for info, _, _ in points]
    if len(profiles) < 2:
        return None
    if all(p.concurrency is not None and not p.open_loop for p in profiles):
        return "concurrency", [float(p.concurrency) for p in profiles]
    if all(p.rate is not None for p in profiles):
        return "offered req/s", [float(p.rate) for p in profiles]
    return None


def _write(
    output: Path,
    points: list[tuple[dict[str, Any], Any, list[Any]]],
    cost: Cost | None,
    axis: tuple[str, list[float]] | None,
) -> None:
    from tokenmill.bench.html_report import write_html
    from tokenmill.bench.records import write_log
    from tokenmill.bench.report import csv_row, write_csv, write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    many = len(points) > 1
    saved = [({k: v for k, v in info.items() if k != "load"}, s, r) for info, s, r in points]
    for i, (info, summary, records) in enumerate(saved):
        stem = f"{output.name}.{i}" if many else output.name
        write_log(output.with_name(stem + ".events.jsonl"), info, records)
        write_json(output.with_name(stem + ".json"), info, summary, cost)
    write_csv(output.with_name(output.name + ".csv"), [csv_row(info, s, cost) for info, s, _ in saved])
    write_html(output.with_name(output.name + ".html"), saved, cost, axis)
    what = f"{len(points)} points" if many else "the run"
    err.print(f"wrote {what} to {output}*.events.jsonl, .json, {output}.csv and {output}.html")


async def _with_progress(
    runner: Any, specs: list[Any], stop: asyncio.Event, http: Any, label: str
) -> list[Any]:
    import numpy as np

    ttfts: list[float] = []
    shown = [0.0]  # when the status line was last recomputed
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
    with Progress(TextColumn("{task.description}"), *columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=len(specs), status="")

        def seen(record: Any) -> None:
            if record.messages and record.anchor is not None:
                ttfts.append(record.messages[0][0] - record.anchor)
            now = time.perf_counter()
            if (
                now - shown[0] < 0.25
            ):  # the client's CPU belongs to the load: percentiles a few times a second
                bar.advance(task)
                return
            shown[0] = now
            elapsed = max(now - runner.started, 1e-9)
            done = bar.tasks[0].completed + 1
            p50, p99 = np.percentile(ttfts, [50, 99]) * 1000 if ttfts else (float("nan"), float("nan"))
            status = f"{done / elapsed:.1f} req/s, TTFT p50 {p50:.0f} ms, p99 {p99:.0f} ms"
            bar.update(task, advance=1, status=status)

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


@app.command("compare")
def compare_runs(
    runs: Annotated[
        list[Path], typer.Argument(help="Two or more runs (PREFIX.json or PREFIX.events.jsonl).")
    ],
    labels: Annotated[str | None, typer.Option(help="Comma-separated names for the runs.")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write the table and Pareto plots here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
) -> None:
    """Compare runs against the first: differences with 95% bootstrap confidence intervals."""
    from rich.markup import escape
    from rich.table import Table

    from tokenmill.bench.compare import STATISTICS, Run, compare

    names = labels.split(",") if labels else [None] * len(runs)
    try:
        if len(runs) < 2:
            raise ValueError("compare needs at least two runs")
        if len(names) != len(runs):
            raise ValueError(f"--labels names {len(names)} runs, {len(runs)} were given")
        loaded = [Run.load(p, n) for p, n in zip(runs, names, strict=True)]
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    table = compare(loaded, seed)
    rows = []
    for key, label, _, _, higher_better in STATISTICS:
        cells = [label]
        for d in table[key]:
            if d.delta is None:
                cells.append(f"{d.value:.2f}")
                continue
            better = (d.delta > 0) == higher_better
            mark = ("[green]" if better else "[red]") if d.significant else ""
            end = "[/]" if mark else ""
            interval = escape(f"[{d.low:+.2f}, {d.high:+.2f}]")
            cells.append(f"{d.value:.2f} {mark}({d.delta:+.2f} {interval}){end}")
        rows.append(cells)
    t = Table(title="against " + loaded[0].label + " (95% bootstrap CI; colored: the interval excludes 0)")
    t.add_column("metric")
    for run in loaded:
        t.add_column(run.label, justify="right")
    for cells in rows:
        t.add_row(*cells)
    out.print(t)
    if html is not None:
        _compare_html(html, loaded, table)
        err.print(f"wrote {html}")


def _compare_html(path: Path, runs: list[Any], table: dict[str, Any]) -> None:
    import html as html_lib

    from tokenmill.bench import plots
    from tokenmill.bench.compare import STATISTICS

    head = "".join(f"<th>{html_lib.escape(r.label)}</th>" for r in runs)
    body = ""
    for key, label, _, _, _ in STATISTICS:
        cells = "".join(
            f"<td>{d.value:.2f}"
            + ("" if d.delta is None else f" ({d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}])")
            + "</td>"
            for d in table[key]
        )
        body += f"<tr><td>{label}</td>{cells}</tr>"
    points = []
    for i, r in enumerate(runs):
        v = {k: table[k][i].value for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99")}
        v["tok_s_per_gpu"] = table["output_tok_s"][i].value / r.gpus
        points.append((r.label, v, r.cost_per_million))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tokenmill bench compare</title>"
        "<style>body{font:14px system-ui;margin:2em auto;max-width:1200px}td,th{padding:3px 10px;"
        "border-bottom:1px solid #ddd;text-align:right}svg{max-width:100%;height:auto}</style></head><body>"
        f"<h1>tokenmill bench compare</h1><p>Differences against {html_lib.escape(runs[0].label)} with 95% "
        f"bootstrap intervals.</p><table><tr><th>metric</th>{head}</tr>{body}</table>"
        f"{plots.pareto(points)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")


@app.command()
def calibrate(
    url: Annotated[str, typer.Argument(help="The server to drive, e.g. http://127.0.0.1:8000.")],
    start_rate: Annotated[
        float, typer.Option(help="First rate tried (req/s); it doubles from there.")
    ] = 100.0,
    seconds: Annotated[float, typer.Option(help="Seconds of load per probe.")] = 3.0,
    output_tokens: Annotated[int, typer.Option(help="Tokens per response: keep it short.", min=1)] = 4,
    max_lag_p99: Annotated[
        float, typer.Option(help="Schedule lag p99 (s) past which the client fell behind.")
    ] = 0.010,
    endpoint: Annotated[str, typer.Option(help="chat or completions.")] = "chat",
    model: Annotated[str | None, typer.Option(help="Model name. Default: the first at /v1/models.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Sent as Authorization: Bearer KEY.", envvar="OPENAI_API_KEY")
    ] = None,
) -> None:
    """How fast this client can drive URL: the highest constant rate it sends on schedule.

    Run it against the server you will measure (or `tokenmill bench mock-server
    --ttft 0 --itl 0` for the client alone): a benchmark above this rate measures
    the client, not the server."""
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.runner import RunSettings

    try:
        settings = RunSettings(
            url.rstrip("/").removesuffix("/v1"),
            LoadProfile("constant", rate=start_rate),
            endpoint=endpoint,
            model=model,
            max_tokens=output_tokens,
            api_key=api_key,
        )
        if not seconds > 0:
            raise ValueError(f"--seconds must be > 0, got {seconds}")
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(_calibrate(settings, seconds, max_lag_p99)))


async def _calibrate(settings: RunSettings, seconds: float, max_lag: float) -> int:
    from rich.table import Table

    from tokenmill.bench.data import RequestSpec
    from tokenmill.bench.metrics import summarize
    from tokenmill.bench.runner import LoadRunner
    from tokenmill.bench.sweep import search_max_rate
    from tokenmill.client import TransportError

    runner = LoadRunner(settings)
    async with runner.transport() as http:
        try:
            await runner.resolve_model(http)
        except (TransportError, ValueError) as e:
            err.print(f"[red]error:[/red] {e}")
            return 2

        async def probe(i: int, profile: LoadProfile) -> Summary:
            n = max(int((profile.rate or 1.0) * seconds), 10)
            specs = [RequestSpec(prompt=f"calibration request {i} {j}") for j in range(n)]
            point = LoadRunner(replace(settings, profile=profile))
            point.model = runner.model
            with err.status(f"probing {profile.rate:.0f} req/s..."):
                return summarize(await point.run(specs, http=http), max_lag_p99=max_lag)

        def on_schedule(s: Summary) -> bool:
            return s.valid and s.failed == 0 and s.achieved_rate >= 0.95 * (s.offered_rate or 0.0)

        found = await search_max_rate(probe, settings.profile.rate or 100.0, on_schedule, 4, 16, "constant")
    table = Table(title="calibration probes (constant rate)")
    for col in (
        "asked req/s",
        "achieved req/s",
        "lag p50 / p99 ms",
        "TTFT p50 / p99 ms",
        "failed",
        "on schedule",
    ):
        table.add_column(col, justify="right")
    for p in found.probes:
        s = p.summary
        lag = (
            f"{s.schedule_lag.median * 1000:.2f} / {s.schedule_lag.p99 * 1000:.2f}" if s.schedule_lag else "-"
        )
        ttft = f"{s.ttft.median * 1000:.2f} / {s.ttft.p99 * 1000:.2f}" if s.ttft else "-"
        ok = "yes" if on_schedule(s) else "no"
        table.add_row(f"{p.profile.rate:.0f}", f"{s.achieved_rate:.1f}", lag, ttft, str(s.failed), ok)
    out.print(table)
    if found.best is None:
        out.print(f"[red]even {found.probes[-1].profile.rate:.1f} req/s ran behind schedule or failed[/red]")
        return 1
    s = found.best.summary
    lag99 = s.schedule_lag.p99 * 1000 if s.schedule_lag else float("nan")
    out.print(
        f"[bold]this client drives {settings.url} at up to {found.max_rate:.0f} req/s[/bold] "
        f"(schedule lag p99 {lag99:.2f} ms); measure below that rate, or the client is what you measure."
    )
    return 0


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
