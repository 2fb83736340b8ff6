"""Quality beside speed and cost: a model's eval accuracy joined with a `tokenmill bench` run of it.

``tokenmill bench run ... -o PREFIX`` writes ``PREFIX.json``; its summary gives
TTFT and TPOT medians and output tokens/s, and, when the run was given
``--gpu-cost-per-hour``, dollars per million output tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class BenchFigures:
    ttft_p50_s: float | None
    tpot_p50_s: float | None
    output_tok_s: float | None
    usd_per_m_output: float | None  # None: the run had no --gpu-cost-per-hour
    source: str
    url: str | None = None  # the endpoint the run measured (its run.url)

    def measured_elsewhere(self, url: str) -> bool:
        """The run measured another endpoint than ``url`` (unknown: no)."""
        return self.url is not None and _normalized(self.url) != _normalized(url)


def load_bench(path: Path) -> BenchFigures:
    if not path.is_file():
        raise ValueError(f"--bench {path} does not exist: allowed the PREFIX.json of a `tokenmill bench run`")
    try:
        data = json.loads(path.read_text())
        summary = data["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--bench {path}: not the JSON of a `tokenmill bench run` (PREFIX.json)") from None

    def median(metric: str) -> float | None:
        value = summary.get(metric)
        return value.get("median") if isinstance(value, dict) else None

    cost: Any = data.get("cost") or {}
    run: Any = data.get("run") or {}
    url = run.get("url") if isinstance(run, dict) else None
    return BenchFigures(
        median("ttft"),
        median("tpot"),
        summary.get("output_tok_s"),
        cost.get("per_million_output_tokens"),
        path.name,
        url if isinstance(url, str) else None,
    )


def _normalized(url: str) -> tuple[str, str, int | None, str]:
    """What makes two URLs the same endpoint: http://LocalHost:8000/v1/ is http://127.0.0.1:8000."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    host = "127.0.0.1" if host in ("localhost", "::1") else host
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number: compare the text
        port = None
    return parts.scheme.lower(), host, port, parts.path.rstrip("/").removesuffix("/v1")


def quality_table(accuracy: dict[str, float | None], bench: dict[str, BenchFigures]) -> list[str]:
    """Markdown rows: accuracy (None: nothing answered) beside each model's latency, throughput and cost."""
    lines = ["## Quality against speed and cost", ""]
    lines += [
        "| model | accuracy | TTFT p50 ms | TPOT p50 ms | output tok/s | $ per M output tokens | bench run |"
    ]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, acc in accuracy.items():
        b = bench.get(name)
        shown = _num(acc, 1, ".1%")
        if b is None:
            lines.append(f"| {name} | {shown} | - | - | - | - | - |")
            continue
        lines.append(
            f"| {name} | {shown} | {_num(b.ttft_p50_s, 1000, '.1f')} | {_num(b.tpot_p50_s, 1000, '.2f')} "
            f"| {_num(b.output_tok_s, 1, '.0f')} | {_num(b.usd_per_m_output, 1, '.3f')} | {b.source} |"
        )
    return lines


def _num(value: float | None, scale: float, spec: str) -> str:
    return "-" if value is None else format(value * scale, spec)
