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


@dataclass(frozen=True, slots=True)
class BenchFigures:
    ttft_p50_s: float | None
    tpot_p50_s: float | None
    output_tok_s: float | None
    usd_per_m_output: float | None  # None: the run had no --gpu-cost-per-hour
    source: str


def load_bench(path: Path) -> BenchFigures:
    try:
        data = json.loads(path.read_text())
        summary = data["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--bench {path}: not the JSON of a `tokenmill bench run` (PREFIX.json)") from None

    def median(metric: str) -> float | None:
        value = summary.get(metric)
        return value.get("median") if isinstance(value, dict) else None

    cost: Any = data.get("cost") or {}
    return BenchFigures(
        median("ttft"),
        median("tpot"),
        summary.get("output_tok_s"),
        cost.get("per_million_output_tokens"),
        path.name,
    )


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
