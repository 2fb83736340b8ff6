"""The figures of a benchmark report, as inline SVG (no files, no network to open them).

matplotlib loads only here, with its non-interactive backend, so a run that
writes no HTML never pays for it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from tokenmill.bench.metrics import Summary
from tokenmill.bench.records import RequestRecord


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prologue: the SVG sits inside HTML


def latency_cdfs(points: list[tuple[str, list[RequestRecord]]]) -> str:
    """Cumulative distributions of TTFT, TPOT and E2E latency, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, records in points:
        ok = [r for r in records if r.ok and r.first_token is not None and r.anchor is not None and r.end]
        series = {
            "TTFT (ms)": [(r.first_token - r.anchor) * 1000 for r in ok],  # type: ignore[operator]
            "TPOT (ms)": [
                (r.last_token - r.first_token) / (r.num_output_tokens - 1) * 1000  # type: ignore[operator]
                for r in ok
                if r.num_output_tokens > 1 and len(r.content) > 1
            ],
            "E2E latency (s)": [r.end - r.anchor for r in ok],  # type: ignore[operator]
        }
        for ax, (name, values) in zip(axes, series.items(), strict=True):
            if values:
                v = np.sort(np.asarray(values))
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
            ax.set_xlabel(name)
            ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    if len(points) > 1:
        axes[-1].legend(fontsize=8)
    return _svg(fig)


def timeline(records: list[RequestRecord], bin_s: float = 1.0) -> str:
    """Output tokens per second and requests in flight over the run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 3.0))
    end = max((r.end for r in records if r.end is not None), default=0.0)
    bins = np.arange(0.0, end + bin_s, bin_s)
    if len(bins) > 1:
        times = [t for r in records for t, n in r.messages for _ in range(n)]
        counts, _ = np.histogram(times, bins=bins)
        ax.step(bins[:-1], counts / bin_s, where="post", label="output tok/s")
        ax.set_ylabel("output tok/s")
        starts = np.sort([r.sent for r in records if r.sent is not None])
        ends = np.sort([r.end for r in records if r.sent is not None and r.end is not None])
        inflight = np.searchsorted(starts, bins[:-1], side="right") - np.searchsorted(
            ends, bins[:-1], side="right"
        )
        ax2 = ax.twinx()
        ax2.step(bins[:-1], inflight, where="post", color="tab:orange", label="in flight")
        ax2.set_ylabel("requests in flight")
    ax.set_xlabel("seconds from start")
    ax.grid(alpha=0.3)
    return _svg(fig)


def sweep_curves(points: list[tuple[str, Summary]], x: list[float], x_label: str, cost: Any = None) -> str:
    """Along a sweep: TTFT and TPOT against load, and against throughput (the curve teams pick from)."""
    plt = _pyplot()
    order = sorted(range(len(x)), key=lambda i: x[i])  # a search probes out of order: draw along x
    points, x = [points[i] for i in order], [x[i] for i in order]
    panels = 3 if cost is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6))
    tput = [s.output_tok_s for _, s in points]
    for stat, style in (("median", "-o"), ("p99", "--o")):
        ttft = [_ms(s.ttft, stat) for _, s in points]
        tpot = [_ms(s.tpot, stat) for _, s in points]
        axes[0].plot(x, ttft, style, label=f"TTFT {stat}")
        axes[0].plot(x, tpot, style, label=f"TPOT {stat}")
        axes[1].plot(tput, ttft, style, label=f"TTFT {stat}")
        axes[1].plot(tput, tpot, style, label=f"TPOT {stat}")
        if cost is not None:
            dollars = [cost.per_million(t) for t in tput]
            axes[2].plot(dollars, ttft, style, label=f"TTFT {stat}")
    axes[0].set_xlabel(x_label)
    axes[1].set_xlabel("output tok/s")
    if cost is not None:
        axes[2].set_xlabel("$ per million output tokens")
    for ax in axes:
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _svg(fig)


def _ms(d: Any, stat: str) -> float:
    return float("nan") if d is None else getattr(d, stat) * 1000


def pareto(runs: list[tuple[str, dict[str, float], float | None]]) -> str:
    """Latency against throughput per GPU (and against $ per million tokens when known), one
    point per configuration: the frontier is what a team chooses from.

    ``runs``: (label, {"ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "tok_s_per_gpu"} in ms and
    tok/s, $ per million output tokens or None)."""
    plt = _pyplot()
    with_cost = all(c is not None for _, _, c in runs)
    fig, axes = plt.subplots(1, 2 if with_cost else 1, figsize=(11 if with_cost else 6, 4), squeeze=False)
    for label, v, dollars in runs:
        xs = [("tok_s_per_gpu", v["tok_s_per_gpu"])] + ([("dollars", dollars)] if with_cost else [])
        for ax, (_, x) in zip(axes[0], xs, strict=True):
            for key, marker in (("ttft_p50", "o"), ("ttft_p99", "^"), ("tpot_p50", "s"), ("tpot_p99", "v")):
                ax.scatter([x], [v[key]], marker=marker, label=f"{label} {key.replace('_', ' ')}")
                ax.annotate(label, (x, v[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0][0].set_xlabel("output tok/s per GPU")
    if with_cost:
        axes[0][1].set_xlabel("$ per million output tokens")
    for ax in axes[0]:
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    return _svg(fig)


def server_timeline(samples: list[dict[str, Any]]) -> str:
    """The server's own gauges over the run (from ``--metrics-url``): running and waiting
    requests, KV cache usage and busy ratio."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 3.0))
    ax2 = ax.twinx()
    for url in sorted({s["url"] for s in samples}):
        mine = [s for s in samples if s["url"] == url]
        t = [s["time"] for s in mine]
        for key, axis, style in (
            ("running", ax, "-"),
            ("waiting", ax, "--"),
            ("kv_usage", ax2, ":"),
            ("busy", ax2, "-."),
        ):
            values = [s["values"].get(key, float("nan")) for s in mine]
            axis.plot(t, values, style, label=f"{url} {key}")
    ax.set_xlabel("seconds from start")
    ax.set_ylabel("requests")
    ax2.set_ylabel("ratio (KV usage, busy)")
    ax2.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="upper right")
    return _svg(fig)
