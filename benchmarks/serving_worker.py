"""One engine, one configuration, one scheduling scenario: measure and write JSON.

    python serving_worker.py --engine tokenmill --scenario priority --model DIR --out r.json \
        --options '{"policy": "priority", "max_num_seqs": 32}'

Started by ``scheduling.py`` (one process per engine and configuration, on a
quiet machine); runs by hand too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from offline_harness import PROGRESS, peak_rss_mb, versions
from serving_scenarios import (
    SCENARIOS,
    Adapter,
    capacity_arrivals,
    chunked_prefill_arrivals,
    class_ttft,
    decode_gaps,
    drive,
    idle_premium_arrivals,
    median_of,
    phase_summary,
    poisson_arrivals,
    priority_load,
    shared_prefix_arrivals,
    warmup_arrivals,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("tokenmill", "vllm"), required=True)
    p.add_argument("--scenario", choices=SCENARIOS, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--options", default="{}", help="engine options as JSON")
    p.add_argument("--rate", type=float, default=None, help="priority: arrivals/s (default: 1.5x capacity)")
    p.add_argument("--repeats", type=int, default=3, help="runs of the scenario; figures are medians")
    p.add_argument(
        "--policies", default="", help="priority: run these policies in turn on the same engine (tokenmill)"
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--t0", type=float, default=None, help="time.time() when the parent spawned us")
    args = p.parse_args()
    t0 = args.t0 or time.time()
    options = json.loads(args.options)
    result: dict[str, Any] = {"engine": args.engine, "scenario": args.scenario, "options": options}
    try:
        adapter = _adapter(args.engine, args.model, options)
        result["versions"] = versions(adapter.dists)  # type: ignore[attr-defined]
        result["startup_s"] = round(time.time() - t0, 2)
        _progress(args, f"ready after {result['startup_s']:.1f} s")
        vocab = _vocab(args.model)
        drive(adapter, warmup_arrivals(vocab, "a"))
        runs = []
        for i in range(args.repeats):
            args.run_index = i
            adapter.reset_prefix_cache()  # each run starts cold, as the first did
            runs.append(SCENARIO_RUNNERS[args.scenario](adapter, vocab, args))
            _progress(args, f"run {i + 1}/{args.repeats} done")
        result.update(median_of(runs))
        result["runs"] = [{k: v for k, v in r.items() if k != "token_ids"} for r in runs]
        result["engine_stats"] = adapter.stats()  # type: ignore[attr-defined]
    except Exception:
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
    result["peak_rss_mb"] = peak_rss_mb()
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if "error" in result else 0


def _adapter(engine: str, model: str, options: dict[str, Any]) -> Adapter:
    if engine == "tokenmill":
        from serving_engine_tokenmill import TokenmillAdapter

        return TokenmillAdapter(model, options)
    from serving_engine_vllm import VllmAdapter

    return VllmAdapter(model, options)


def _vocab(model: str) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def _progress(args: argparse.Namespace, message: str) -> None:
    print(f"{PROGRESS} {args.engine} {args.scenario} {args.options}: {message}", flush=True)


def run_shared_prefix(adapter: Adapter, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    records = drive(adapter, shared_prefix_arrivals(vocab, args.quick))
    summary = phase_summary(records)
    _progress(args, f"mean TTFT {summary['mean_ttft_s']:.2f} s, total {summary['duration_s']:.2f} s")
    return {"summary": summary, "token_ids": {r.rid: r.token_ids for r in records.values()}}


def run_priority(adapter: Adapter, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    load = priority_load(args.quick)
    cap = phase_summary(drive(adapter, capacity_arrivals(vocab, load)))
    capacity = cap["completed"] / cap["duration_s"]
    idle = [
        phase_summary(drive(adapter, phase))["mean_ttft_s"] for phase in idle_premium_arrivals(vocab, load)
    ]
    rate = args.rate or load.overload * capacity
    _progress(args, f"capacity {capacity:.2f} req/s, idle premium TTFT {statistics.median(idle):.3f} s")
    out: dict[str, Any] = {
        "load": load.__dict__,
        "capacity_req_s": capacity,
        "rate_req_s": rate,
        "idle_premium_ttft_s": statistics.median(idle),
    }
    policies = args.policies.split(",") if args.policies else [None]
    if args.run_index % 2:  # alternate which policy goes first, so drift favours neither
        policies.reverse()
    for policy in policies:
        if policy is not None:
            adapter.set_policy(policy)  # type: ignore[attr-defined]
        # The same seeded prompts run once per policy: the second must not hit the first's cache.
        adapter.reset_prefix_cache()
        records = drive(adapter, poisson_arrivals(vocab, load, rate))
        result = {
            "summary": phase_summary(records),
            "premium": class_ttft(records, 1),
            "standard": class_ttft(records, 0),
        }
        _progress(
            args,
            f"{policy or ''} premium p99 TTFT {result['premium']['p99_ttft_s']:.3f} s, "
            f"{result['summary']['output_tok_s']:.0f} tok/s",
        )
        if policy is None:
            out.update(result)
        else:
            out[policy] = result
    if "priority" in out and "fcfs" in out:
        fcfs_tput = out["fcfs"]["summary"]["output_tok_s"]
        out["throughput_vs_fcfs"] = out["priority"]["summary"]["output_tok_s"] / fcfs_tput
    return out


def run_chunked_prefill(adapter: Adapter, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    records = drive(adapter, chunked_prefill_arrivals(vocab, args.quick))
    gaps = decode_gaps(records, exclude="long")
    long = records["long"]
    out = {"summary": phase_summary(records), "gaps": gaps, "long_ttft_s": long.ttft}
    _progress(
        args,
        f"median gap {gaps['median_gap_s'] * 1e3:.0f} ms, max {gaps['max_gap_s'] * 1e3:.0f} ms, "
        f"long TTFT {long.ttft:.2f} s",
    )
    return out


SCENARIO_RUNNERS = {
    "shared_prefix": run_shared_prefix,
    "priority": run_priority,
    "chunked_prefill": run_chunked_prefill,
}

if __name__ == "__main__":
    sys.exit(main())
