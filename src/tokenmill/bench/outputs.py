"""The files of a run or sweep (``tokenmill bench run -o PREFIX``): event logs, summaries, CSV, HTML.

A point is (run info, summary, records); the info's ``load`` (its LoadProfile)
stays in memory: the files carry its label.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenmill.bench.html_report import write_html
from tokenmill.bench.records import write_log
from tokenmill.bench.report import Cost, csv_row, write_csv, write_json


def sweep_axis(points: list[tuple[dict[str, Any], Any, list[Any]]]) -> tuple[str, list[float]] | None:
    """What a sweep varied (concurrency or rate), read back from its points' profiles."""
    profiles = [info["load"] for info, _, _ in points]
    if len(profiles) < 2:
        return None
    if all(p.concurrency is not None and not p.open_loop for p in profiles):
        return "concurrency", [float(p.concurrency) for p in profiles]
    if all(p.rate is not None for p in profiles):
        return "offered req/s", [float(p.rate) for p in profiles]
    return None


def check_prefix(output: Path, numbered: bool) -> None:
    """Refuse, before anything is measured, a prefix whose files could not be written: a
    measurement whose results are lost at the end is worse than an error at the start."""
    if not output.name or str(output).endswith(("/", os.sep)) or output.is_dir():
        raise ValueError(
            f"-o {str(output)!r} must be a file prefix such as runs/c8 (the files are PREFIX.json, ...), "
            "not a folder"
        )
    stems = [output.name + ".0", output.name] if numbered else [output.name]
    for stem in stems:
        for ext in (".events.jsonl", ".json", ".csv", ".html", ".search.json"):
            if output.with_name(stem + ext).is_dir():
                raise ValueError(f"-o {output}: {output.with_name(stem + ext)} is a folder")
    probe = output.with_name(f".{output.name}.{os.getpid()}.probe")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"-o {output}: cannot write in {output.parent}: {e.strerror or e}") from None


def write_files(
    output: Path,
    points: list[tuple[dict[str, Any], Any, list[Any]]],
    cost: Cost | None,
    axis: tuple[str, list[float]] | None,
    search: dict[str, Any] | None = None,
    numbered: bool | None = None,
) -> str:
    """Every point's event log and JSON summary, one CSV and one HTML report (and a max-goodput
    search's answer and probes in ``PREFIX.search.json``); says what it wrote. ``numbered``:
    files per point as ``PREFIX.N.*`` (default: when there are several points; a sweep cut
    short after its first point still numbers it)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    many = len(points) > 1 if numbered is None else numbered
    # An earlier run's files under the same prefix are replaced: said, so it is no surprise.
    replaced = any(output.with_name(output.name + ext).exists() for ext in (".csv", ".html"))
    saved = [({k: v for k, v in info.items() if k != "load"}, s, r) for info, s, r in points]
    for i, (info, summary, records) in enumerate(saved):
        stem = f"{output.name}.{i}" if many else output.name
        write_log(output.with_name(stem + ".events.jsonl"), info, records)
        write_json(output.with_name(stem + ".json"), info, summary, cost)
    write_csv(output.with_name(output.name + ".csv"), [csv_row(info, s, cost) for info, s, _ in saved])
    write_html(output.with_name(output.name + ".html"), saved, cost, axis, search)
    if many:
        last = len(points) - 1
        per_point = f"{output}.N.events.jsonl and .N.json (N = 0{f'..{last}' if last else ''})"
        wrote = f"wrote {len(points)} point{'s' if len(points) > 1 else ''} to {per_point}, "
        wrote += f"{output}.csv and {output}.html"
    else:
        wrote = f"wrote the run to {output}.events.jsonl, .json, .csv and .html"
    if replaced:
        wrote += " (replacing an earlier run's files)"
    if search is not None:
        path = output.with_name(output.name + ".search.json")
        path.write_text(json.dumps(search, indent=2) + "\n", encoding="utf-8")
        wrote += f", the search to {path}"
    return wrote
