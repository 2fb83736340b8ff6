"""``tokenmill bench`` beyond ``run``: recompute a report, compare runs, calibrate the client, mock server.

The commands register on ``tokenmill.cli.bench.app``.
"""

from __future__ import annotations

import asyncio
import math
import signal
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from tokenmill.cli.bench import app, err, out

if TYPE_CHECKING:
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.metrics import Summary
    from tokenmill.bench.runner import RunSettings
    from tokenmill.bench.sweep import Point


@app.command()
def report(
    events: Annotated[Path, typer.Argument(help="A run's .events.jsonl (or its PREFIX.json).")],
    slo: Annotated[str | None, typer.Option(help="Goodput targets, e.g. ttft=0.3,tpot=0.05.")] = None,
    max_lag_p99: Annotated[
        float, typer.Option(help="Schedule lag p99 (s) past which a run is invalid.")
    ] = 0.010,
    gpu_cost_per_hour: Annotated[
        float | None,
        typer.Option(help="$ per GPU-hour, for $ per million tokens (default: the run's, if it had one)."),
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(help="GPUs behind the endpoint, with --gpu-cost-per-hour (default 1).")
    ] = None,
) -> None:
    """Recompute a run's report from its event log (other SLOs or costs, say)."""
    from tokenmill.bench.metrics import SLO, summarize
    from tokenmill.bench.options import check_cost, check_max_lag
    from tokenmill.bench.records import read_log
    from tokenmill.bench.report import Cost, print_summary

    try:
        check_max_lag(max_lag_p99)
        check_cost(gpu_cost_per_hour, gpus)
        goals = SLO.parse(slo) if slo else None
        header, records = read_log(events)
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    saved = header.get("cost") or {}
    per_hour = gpu_cost_per_hour if gpu_cost_per_hour is not None else saved.get("gpu_cost_per_hour")
    cost = Cost(per_hour, gpus or int(saved.get("gpus", 1))) if per_hour is not None else None
    print_summary(out, header, summarize(records, goals, max_lag_p99), cost)


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

    from tokenmill.bench.compare import NO_INTERVAL_WHY, STATISTICS, Run, compare, mismatches
    from tokenmill.bench.html_report import check_html_path

    names: list[str | None] = [n.strip() for n in labels.split(",")] if labels else [None] * len(runs)
    try:
        if len(runs) < 2:
            raise ValueError("compare needs at least two runs")
        if len(names) != len(runs):
            raise ValueError(f"--labels names {len(names)} runs, {len(runs)} were given")
        if labels and (not all(names) or len(set(names)) != len(names)):
            raise ValueError(f"--labels must give each run its own non-empty name, got {labels!r}")
        if seed < 0:
            raise ValueError(f"--seed must be >= 0, got {seed}")
        if html is not None:
            check_html_path(html)
        loaded = [Run.load(p, n) for p, n in zip(runs, names, strict=True)]
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    for warning in mismatches(loaded):
        err.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    table = compare(loaded, seed)
    rows = []
    for key, label, _, _, higher_better in STATISTICS:
        cells = [label]
        for d in table[key]:
            if d.delta is None or d.low is None or d.high is None or math.isnan(d.delta):
                # the baseline, no interval, or a run with nothing to measure (NaN)
                delta = "" if d.delta is None or math.isnan(d.delta) else f" ({d.delta:+.2f})"
                cells.append(("-" if math.isnan(d.value) else f"{d.value:.2f}") + delta)
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
    out.print(f"[dim]{NO_INTERVAL_WHY}[/dim]", highlight=False)
    if html is not None:
        from tokenmill.bench.html_report import write_compare_html

        write_compare_html(html, loaded, table)
        err.print(f"wrote {escape(str(html))}", highlight=False)


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
        str | None,
        typer.Option(
            help="Sent as Authorization: Bearer KEY.", envvar=["TOKENMILL_API_KEY", "OPENAI_API_KEY"]
        ),
    ] = None,
) -> None:
    """How fast this client can drive URL: the highest constant rate it sends on schedule.

    Run it against the server you will measure (or `tokenmill bench mock-server
    --ttft 0 --itl 0` for the client alone): a benchmark above this rate measures
    the client, not the server."""
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.options import check_max_lag
    from tokenmill.bench.runner import RunSettings

    try:
        if not 0 < start_rate < math.inf:
            raise ValueError(f"--start-rate must be a finite number of requests/s > 0, got {start_rate:g}")
        if not 0 < seconds < math.inf:
            raise ValueError(f"--seconds must be a finite number > 0, got {seconds:g}")
        if start_rate * seconds < MIN_PROBE_REQUESTS:
            raise ValueError(
                f"--start-rate {start_rate:g} for --seconds {seconds:g} sends "
                f"{start_rate * seconds:.3g} requests a probe: raise either to give at least "
                f"{MIN_PROBE_REQUESTS}"
            )
        check_max_lag(max_lag_p99)
        settings = RunSettings(
            url.rstrip("/").removesuffix("/v1"),
            LoadProfile("constant", rate=start_rate),
            endpoint=endpoint,
            model=model,
            max_tokens=output_tokens,
            api_key=api_key,
        )
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    raise typer.Exit(asyncio.run(_calibrate(settings, seconds, max_lag_p99)))


# A probe sends rate x seconds requests, at least 2 (a rate needs two sends); the first probe
# at least this many, so the search's lowest rate (the start / 16) still ends within ~2x seconds.
MIN_PROBE_REQUESTS = 10
REFUSALS = {400, 401, 403, 404}  # statuses no rate can fix: a wrong request, key or model


async def _calibrate(settings: RunSettings, seconds: float, max_lag: float) -> int:

    from tokenmill.bench.data import RequestSpec
    from tokenmill.bench.metrics import summarize
    from tokenmill.bench.runner import LoadRunner
    from tokenmill.bench.sweep import CLIENT_BEHIND, PASS, Point, search_max_rate
    from tokenmill.client import TransportError

    runner = LoadRunner(settings)
    probes: list[Point] = []  # kept here too, so a Ctrl-C still shows the probes measured
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    refused: str | None = None
    found = None
    try:
        async with runner.transport() as http:
            try:
                await runner.resolve_model(http)
            except (TransportError, ValueError) as e:
                err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
                return 2

            async def probe(i: int, profile: LoadProfile) -> Summary:
                if stop.is_set():
                    raise _Interrupted()
                n = max(int((profile.rate or 1.0) * seconds), 2)
                specs = [RequestSpec(prompt=f"calibration request {i} {j}") for j in range(n)]
                point = LoadRunner(replace(settings, profile=profile))
                point.model = runner.model
                with err.status(f"probing {_rate(profile.rate or 0.0)} req/s..."):
                    records = await point.run(specs, http=http, stop=stop)
                if stop.is_set():
                    raise _Interrupted()
                bad = next((r for r in records if r.status in REFUSALS), None)
                if bad is not None:
                    raise _Interrupted(f"the server refused a request ({bad.status}): {bad.error}")
                summary = summarize(records, max_lag_p99=max_lag)
                probes.append(Point(profile, summary))
                return summary

            def judge(s: Summary) -> str:
                return PASS if _on_schedule(s) else CLIENT_BEHIND

            try:
                found = await search_max_rate(probe, settings.profile, judge, 4, 16)
            except _Interrupted as e:
                refused = e.args[0] if e.args else None
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if probes:
        _print_probes(probes)
    if refused is not None:
        err.print(f"[red]error:[/red] {escape(refused)}; no rate fixes that", highlight=False)
        return 2
    if found is None:
        err.print("[yellow]stopped early: the table shows the probes measured[/yellow]")
        return 130
    if found.best is None:
        lowest = _rate(found.probes[-1].profile.rate or 0.0)
        out.print(f"[red]even {lowest} req/s ran behind schedule or failed[/red]")
        return 1
    s = found.best.summary
    rate = found.best.profile.rate or 0.0
    lag99 = s.schedule_lag.p99 * 1000 if s.schedule_lag else float("nan")
    out.print(
        f"[bold]this client drives {escape(settings.url)} at up to {rate:.0f} req/s[/bold] "
        f"(schedule lag p99 {lag99:.2f} ms); measure below that rate, or the client is what you measure."
    )
    return 0


class _Interrupted(Exception):
    """Calibration stops: Ctrl-C (no message), or a refusal no rate fixes (its message)."""


def _on_schedule(s: Summary) -> bool:
    return s.valid and s.failed == 0 and s.achieved_rate >= 0.95 * (s.offered_rate or 0.0)


def _rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 10 else f"{rate:.3g}"


def _print_probes(probes: list[Point]) -> None:
    from rich.table import Table

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
    for p in probes:
        s = p.summary
        lag = (
            f"{s.schedule_lag.median * 1000:.2f} / {s.schedule_lag.p99 * 1000:.2f}" if s.schedule_lag else "-"
        )
        ttft = f"{s.ttft.median * 1000:.2f} / {s.ttft.p99 * 1000:.2f}" if s.ttft else "-"
        ok = "yes" if _on_schedule(s) else "no"
        table.add_row(_rate(p.profile.rate or 0.0), f"{s.achieved_rate:.1f}", lag, ttft, str(s.failed), ok)
    out.print(table)


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
    crash_after: Annotated[
        int, typer.Option(help="Die once N requests were answered: drop every connection (0: never).")
    ] = 0,
    empty_every: Annotated[
        int, typer.Option(help="Stream every Nth token with empty text, as for a split UTF-8 character.")
    ] = 0,
    api_key: Annotated[
        str | None, typer.Option(help="Answer 401 to requests without Authorization: Bearer KEY.")
    ] = None,
    strict_model: Annotated[
        bool, typer.Option(help="Answer 404 model_not_found to requests naming another model.")
    ] = False,
) -> None:
    """An OpenAI-compatible server with exact timings (TTFT, ITL, length)."""
    from tokenmill.bench.mock_server import MockConfig, MockServer

    try:
        if not 0 <= port <= 65535:
            raise ValueError(f"--port must be in 0..65535 (0: any free port), got {port}")
        config = MockConfig(
            ttft,
            itl,
            output_tokens,
            model,
            worker_id,
            fail_every,
            cut_every,
            crash_after,
            empty_every,
            api_key,
            strict_model,
        )
    except ValueError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
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
