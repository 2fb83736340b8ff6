"""What a run leaves behind: a terminal table, a JSON summary, a CSV row, the event log.

The JSON holds the run's settings, the formulas of every metric
(``bench/metrics.py``) and the summary; the CSV one row per run with the
headline figures, so runs of a sweep or of several tools line up in a sheet.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokenmill.bench.metrics import FORMULAS, HEADER, Distribution, Summary

LATENCIES = (
    ("ttft", "TTFT"),
    ("tpot", "TPOT"),
    ("itl", "ITL"),
    ("e2e", "E2E latency"),
    ("schedule_lag", "schedule lag"),
    ("queue_wait", "queue wait (cap)"),
)


@dataclass(frozen=True)
class Cost:
    """What the serving hardware costs, to turn throughput into $ per million tokens."""

    gpu_cost_per_hour: float
    gpus: int = 1

    def per_million(self, tok_s: float) -> float | None:
        if tok_s <= 0:
            return None
        return self.gpu_cost_per_hour * self.gpus / (tok_s * 3600.0) * 1e6


def print_summary(console: Console, run: dict[str, Any], s: Summary, cost: Cost | None = None) -> None:
    # Every text below that came from the user or the server (model, file names, worker names,
    # its messages) is escaped: a "[/x]" in one must print as such, not end the run in a
    # markup error before its files are written.
    what = escape(f"model {run['model']!r}, {run['endpoint']}, {run['profile']}, {run['data']}")
    console.print(f"[bold]{escape(str(run['url']))}[/bold] {what}")
    console.print(f"[dim]{HEADER}[/dim]", highlight=False)
    table = Table(title="latency (ms)", title_justify="left")
    table.add_column("metric")
    for col in ("mean", "median", "p90", "p95", "p99", "max"):
        table.add_column(col, justify="right")
    for key, label in LATENCIES:
        d: Distribution | None = getattr(s, key)
        if d is not None:
            table.add_row(
                label,
                *(f"{getattr(d, c) * 1000:.1f}" for c in ("mean", "median", "p90", "p95", "p99", "max")),
            )
    if s.per_user_tok_s is not None:
        d = s.per_user_tok_s
        table.add_row(
            "per-user tok/s",
            *(f"{getattr(d, c):.1f}" for c in ("mean", "median", "p90", "p95", "p99", "max")),
        )
    console.print(table)
    lines = [
        f"requests: {s.succeeded} ok, {s.failed} failed of {s.requests} in {s.duration_s:.2f} s"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(s.errors.items()))})" if s.errors else ""),
        *(f"  {kind}: {escape(sample)}" for kind, sample in sorted(s.error_samples.items())),
        f"throughput: {s.request_tput:.2f} req/s, output {s.output_tok_s:.1f} tok/s, "
        f"input {s.input_tok_s:.1f} tok/s, total {s.total_tok_s:.1f} tok/s",
        f"send rate: achieved {s.achieved_rate:.2f} req/s"
        + (f", offered {s.offered_rate:.2f} req/s" if s.offered_rate is not None else ""),
    ]
    if s.queue_wait is not None:
        lines.append(
            f"queue wait: {s.queued} of {s.queue_wait.count} requests waited for a free slot under "
            f"--max-concurrency (p99 {s.queue_wait.p99 * 1000:.0f} ms): the server's backlog, "
            "inside TTFT and E2E, not the client's schedule lag"
        )
    if s.slo is not None:
        lines.append(
            f"goodput ({s.slo}): {s.goodput:.2f} req/s, {s.good_fraction:.1%} of requests met every SLO"
        )
    if cost is not None:
        out, total = cost.per_million(s.output_tok_s), cost.per_million(s.total_tok_s)
        if out is not None and total is not None:
            lines.append(
                f"cost: ${out:.3f} per million output tokens, ${total:.3f} per million tokens in all"
            )
    if s.workers:
        spread = ", ".join(
            f"{escape(w)} {v['requests']} req / {v['output_tokens']} tok"
            for w, v in sorted(s.workers.items())
        )
        lines.append(f"workers: {spread} (max/mean: {_imbalance(s)})")
    if s.token_mismatches:
        lines.append(
            f"[yellow]token counts: {s.token_mismatches} requests where the usage differs "
            "from what was asked or streamed[/yellow]"
        )
    if s.retokenized:
        style = "yellow" if s.retokenized_mismatches else "dim"
        lines.append(
            f"[{style}]token check: {s.retokenized_mismatches} of {s.retokenized} replies re-tokenized "
            f"to another count than the server's usage[/{style}]"
        )
    server = run.get("server_metrics") or {}
    for url, g in (server.get("summary") or {}).items():
        gauges = [k for k in ("running", "waiting", "kv_usage", "busy") if k + "_mean" in g]
        parts = [f"{k} mean {g[k + '_mean']:.2f} max {g[k + '_max']:.2f}" for k in gauges]
        lines.append(f"server {escape(url)}: " + "; ".join(parts))
    for url, error in (server.get("errors") or {}).items():
        lines.append(f"[yellow]server metrics from {escape(url)} failed: {escape(str(error))}[/yellow]")
    for note in run.get("notes") or ():
        lines.append(f"[yellow]{escape(note)}[/yellow]")
    for line in lines:
        console.print(line, highlight=False)
    if not s.valid:
        console.print(f"[bold red]invalid run:[/bold red] {escape(s.invalid_reason or '')}")


def print_sweep(console: Console, points: list[tuple[str, Summary]], cost: Cost | None = None) -> None:
    """One row per load: where throughput stops growing and latency starts to."""
    table = Table(title="sweep", title_justify="left")
    for col in ("load", "req/s", "output tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms", "goodput req/s"):
        table.add_column(col, justify="left" if col == "load" else "right")
    if cost is not None:
        table.add_column("$ / M output tokens", justify="right")
        table.add_column("$ / M tokens", justify="right")
    for label, s in points:
        row = [
            escape(label),
            f"{s.request_tput:.2f}",
            f"{s.output_tok_s:.1f}",
            _p50_p99(s.ttft),
            _p50_p99(s.tpot),
        ]
        row.append(f"{s.goodput:.2f}" if s.goodput is not None else "-")
        if cost is not None:
            row += cost_cells(cost, s)
        table.add_row(*row, style=None if s.valid else "red")
    console.print(table)


def cost_cells(cost: Cost, s: Summary) -> list[str]:
    """$ per million output tokens and $ per million tokens (input and output) at one load."""
    cells = []
    for tok_s in (s.output_tok_s, s.total_tok_s):
        per_m = cost.per_million(tok_s)
        cells.append(f"{per_m:.3f}" if per_m is not None else "-")
    return cells


def _imbalance(s: Summary) -> str:
    tokens = f"{s.worker_token_imbalance:.2f}" if s.worker_token_imbalance is not None else "-"
    return f"requests {s.worker_imbalance:.2f}, tokens {tokens}"


def _p50_p99(d: Distribution | None) -> str:
    return "-" if d is None else f"{d.median * 1000:.1f} / {d.p99 * 1000:.1f}"


def write_json(path: Path, run: dict[str, Any], s: Summary, cost: Cost | None = None) -> None:
    payload = {"run": run, "formulas": FORMULAS, "summary": s.to_json()}
    if cost is not None:
        payload["cost"] = {
            **asdict(cost),
            "per_million_output_tokens": cost.per_million(s.output_tok_s),
            "per_million_tokens": cost.per_million(s.total_tok_s),
        }
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def csv_row(run: dict[str, Any], s: Summary, cost: Cost | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "profile": run["profile"],
        "requests": s.requests,
        "failed": s.failed,
        "duration_s": round(s.duration_s, 3),
        "req_s": round(s.request_tput, 3),
        "output_tok_s": round(s.output_tok_s, 1),
        "total_tok_s": round(s.total_tok_s, 1),
    }
    for key, _ in LATENCIES:
        d = getattr(s, key)
        for stat in ("mean", "median", "p99"):
            row[f"{key}_{stat}_ms"] = round(getattr(d, stat) * 1000, 2) if d is not None else None
    row["goodput_req_s"] = round(s.goodput, 3) if s.goodput is not None else None
    if cost is not None:
        for key, tok_s in (("usd_per_m_output_tokens", s.output_tok_s), ("usd_per_m_tokens", s.total_tok_s)):
            per_m = cost.per_million(tok_s)
            row[key] = round(per_m, 4) if per_m is not None else None
    row["valid"] = s.valid
    if "search_probe" in run:
        row["search_probe"] = run["search_probe"]
    return row


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
