"""``tokenmill bench`` beyond ``run``: recompute a report, compare runs, calibrate the client, mock server.

The commands register on ``tokenmill.cli.bench.app``.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tokenmill.cli.bench import app, err, out

if TYPE_CHECKING:
    from tokenmill.bench.load import LoadProfile
    from tokenmill.bench.metrics import Summary
    from tokenmill.bench.runner import RunSettings


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

    from tokenmill.bench.compare import NO_INTERVAL_WHY, STATISTICS, Run, compare

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
            if d.delta is None or d.low is None or d.high is None:  # the baseline, or no interval
                delta = "" if d.delta is None else f" ({d.delta:+.2f})"
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
        err.print(f"wrote {html}")


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
    from tokenmill.bench.sweep import CLIENT_BEHIND, PASS, search_max_rate
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

        def judge(s: Summary) -> str:
            return PASS if on_schedule(s) else CLIENT_BEHIND

        found = await search_max_rate(probe, settings.profile, judge, 4, 16)
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
    rate = found.best.profile.rate or 0.0
    lag99 = s.schedule_lag.p99 * 1000 if s.schedule_lag else float("nan")
    out.print(
        f"[bold]this client drives {settings.url} at up to {rate:.0f} req/s[/bold] "
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
    crash_after: Annotated[
        int, typer.Option(help="Die once N requests were answered: drop every connection (0: never).")
    ] = 0,
) -> None:
    """An OpenAI-compatible server with exact timings (TTFT, ITL, length)."""
    from tokenmill.bench.mock_server import MockConfig, MockServer

    try:
        config = MockConfig(ttft, itl, output_tokens, model, worker_id, fail_every, cut_every, crash_after)
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
