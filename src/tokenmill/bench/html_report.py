"""One self-contained HTML file per run or sweep: settings, formulas, tables and plots inline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from tokenmill.bench import plots
from tokenmill.bench.metrics import FORMULAS, Summary
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.report import LATENCIES, Cost, cost_cells

_TEMPLATE = jinja2.Environment(autoescape=True).from_string(
    """<!doctype html>
<html><head><meta charset="utf-8"><title>tokenmill bench: {{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.invalid { color: #b00; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; }
svg { max-width: 100%; height: auto; }
</style></head><body>
<h1>tokenmill bench: {{ title }}</h1>
<table>{% for k, v in settings %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
{% if sweep %}<h2>Sweep</h2>
<table><tr><th>load</th><th>req/s</th><th>output tok/s</th><th>TTFT p50 / p99 ms</th>
<th>TPOT p50 / p99 ms</th><th>goodput req/s</th>
{% if cost %}<th>$ / M output tokens</th><th>$ / M tokens</th>{% endif %}<th>valid</th>
{% if search %}<th>probe</th>{% endif %}</tr>
{% for row in sweep %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{{ sweep_svg | safe }}{% endif %}
{% if search %}<h2>Max goodput search</h2><p>max goodput rate ({{ search.slo }},
{{ "%.0f" % (100 * search.target) }}% good): <b>{{ search.answer }}</b></p>{% endif %}
{% for p in points %}<h2>{{ p.label }}</h2>
{% if not p.summary.valid %}<p class="invalid">invalid run: {{ p.summary.invalid_reason }}</p>{% endif %}
{% for note in p.notes %}<p class="invalid">{{ note }}</p>{% endfor %}
<p>{{ p.summary.succeeded }} ok, {{ p.summary.failed }} failed of {{ p.summary.requests }} in
{{ "%.2f" % p.summary.duration_s }} s; {{ "%.2f" % p.summary.request_tput }} req/s,
output {{ "%.1f" % p.summary.output_tok_s }} tok/s, input {{ "%.1f" % p.summary.input_tok_s }} tok/s
{% if p.summary.goodput is not none %}; goodput ({{ p.summary.slo }}) {{ "%.2f" % p.summary.goodput }} req/s,
{{ "%.1f" % (100 * p.summary.good_fraction) }}% good{% endif %}{% if p.cost %}; {{ p.cost }}{% endif %}</p>
<table><tr><th>ms</th><th>mean</th><th>median</th><th>p90</th><th>p95</th><th>p99</th><th>max</th></tr>
{% for row in p.latency %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% if p.summary.errors %}<p>errors:</p><ul>
{% for k, v in p.summary.errors.items() %}<li>{{ k }} {{ v }}{% if p.summary.error_samples[k] %}, e.g.
<code>{{ p.summary.error_samples[k] }}</code>{% endif %}</li>{% endfor %}</ul>{% endif %}
{% if p.summary.workers %}<p>workers (max/mean: requests {{ "%.2f" % p.summary.worker_imbalance }},
tokens {{ "%.2f" % (p.summary.worker_token_imbalance or 0) }}):
{% for w, v in p.summary.workers.items() %}{{ w }} {{ v.requests }} requests,
{{ v.output_tokens }} tokens; {% endfor %}</p>{% endif %}
{{ p.timeline | safe }}
{% if p.server %}<h3>The server's own metrics</h3>{{ p.server | safe }}{% endif %}
{% endfor %}
<h2>Latency distributions</h2>
{{ cdf_svg | safe }}
<h2>Definitions</h2><pre>{{ formulas }}</pre>
</body></html>
"""
)


def write_html(
    path: Path,
    points: list[tuple[dict[str, Any], Summary, list[RequestRecord]]],
    cost: Cost | None = None,
    sweep_axis: tuple[str, list[float]] | None = None,
    search: dict[str, Any] | None = None,
) -> None:
    """``points``: (run info, summary, records) per load; ``sweep_axis``: the x of a sweep's curves;
    ``search``: a max-goodput search's result (``GoodputSearch.to_json`` with its slo and target)."""
    first = points[0][0]
    settings = [(k, first[k]) for k in ("url", "model", "endpoint", "data", "started", "seed") if k in first]
    sweep_rows, sweep_svg = [], ""
    if len(points) > 1:
        for info, s, _ in points:
            row = [
                info["profile"],
                f"{s.request_tput:.2f}",
                f"{s.output_tok_s:.1f}",
                _pair(s.ttft),
                _pair(s.tpot),
            ]
            row.append(f"{s.goodput:.2f}" if s.goodput is not None else "-")
            if cost is not None:
                row += cost_cells(cost, s)
            row.append("yes" if s.valid else "no")
            if search is not None:
                row.append(info.get("search_probe", "-"))
            sweep_rows.append(row)
        if sweep_axis is not None:
            name, x = sweep_axis
            sweep_svg = plots.sweep_curves([(i["profile"], s) for i, s, _ in points], x, name, cost)
    rendered = []
    for info, s, records in points:
        latency = []
        for key, label in LATENCIES:
            d = getattr(s, key)
            if d is not None:
                latency.append(
                    [
                        label,
                        *(
                            f"{getattr(d, c) * 1000:.1f}"
                            for c in ("mean", "median", "p90", "p95", "p99", "max")
                        ),
                    ]
                )
        dollars = cost_cells(cost, s) if cost is not None else None
        rendered.append(
            {
                "label": info["profile"],
                "summary": s,
                "notes": info.get("notes") or [],
                "latency": latency,
                "cost": f"${dollars[0]} per million output tokens, ${dollars[1]} per million tokens"
                if dollars is not None
                else None,
                "timeline": plots.timeline(records),
                "server": plots.server_timeline(samples) if (samples := _samples(info)) else "",
            }
        )
    html = _TEMPLATE.render(
        title=f"max goodput search, {len(points)} probes"
        if search is not None
        else first["profile"]
        if len(points) == 1
        else f"sweep of {len(points)} loads",
        settings=settings,
        sweep=sweep_rows,
        sweep_svg=sweep_svg,
        search=search,
        cost=cost,
        points=rendered,
        cdf_svg=plots.latency_cdfs([(i["profile"], r) for i, _, r in points]),
        formulas=FORMULAS,
    )
    path.write_text(html, encoding="utf-8")


def _samples(info: dict[str, Any]) -> list[dict[str, Any]]:
    return (info.get("server_metrics") or {}).get("samples") or []


def _pair(d: Any) -> str:
    return "-" if d is None else f"{d.median * 1000:.1f} / {d.p99 * 1000:.1f}"


def check_html_path(path: Path) -> None:
    """Before the work: a report path that is a folder, or in a folder that does not exist."""
    if path.is_dir():
        raise ValueError(f"--html {path} is a folder: give a file such as {path / 'compare.html'}")
    if not path.parent.is_dir():
        raise ValueError(f"--html {path}: folder {path.parent} does not exist")


def write_compare_html(path: Path, runs: list[Any], table: dict[str, Any]) -> None:
    """``tokenmill bench compare --html``: the differences table and the Pareto plots."""
    import html as html_lib

    from tokenmill.bench.compare import NO_INTERVAL_WHY, STATISTICS

    head = "".join(f"<th>{html_lib.escape(r.label)}</th>" for r in runs)
    body = ""
    for key, label, _, _, _ in STATISTICS:
        cells = "".join(f"<td>{_difference(d)}</td>" for d in table[key])
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
        f"bootstrap intervals; {html_lib.escape(NO_INTERVAL_WHY)}.</p>"
        f"<table><tr><th>metric</th>{head}</tr>{body}</table>"
        f"{plots.pareto(points)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")


def _difference(d: Any) -> str:
    value = "-" if d.value != d.value else f"{d.value:.2f}"  # NaN: no request to measure
    if d.delta is None or d.delta != d.delta:  # the baseline, or NaN: no request to measure
        return value
    if d.low is None or d.high is None:
        return f"{value} ({d.delta:+.2f})"
    return f"{value} ({d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}])"
