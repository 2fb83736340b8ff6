"""The markdown summary of a GPU bench run, rendered from its results.json contents."""

from __future__ import annotations

from typing import Any


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _ratio(a: Any, b: Any) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}x"


def render_summary(results: dict[str, Any]) -> str:
    meta, steps = results.get("meta", {}), results.get("steps", {})
    lines = [f"# tokenmill GPU bench ({_get(meta, 'shape', 'name')})", ""]
    lines += [
        f"Started {meta.get('started')}; wall {meta.get('wall_s', '–')} s; `{' '.join(meta.get('argv', []))}`"
    ]
    lines += ["", "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, s in steps.items():
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '–')} | {s.get('error', '')} |")
    env = _get(steps, "environment", "data") or {}
    if env:
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    lines += _parity(_get(steps, "parity", "data") or [])
    lines += _performance(meta, _get(steps, "tokenmill", "data"), _get(steps, "transformers", "data"))
    lines += _fp8(_get(steps, "tokenmill", "data"), _get(steps, "tokenmill-fp8", "data"))
    return "\n".join(lines) + "\n"


def _fp8(bf16: Any, fp8: Any) -> list[str]:
    """tokenmill fp8 against tokenmill bf16 on the same checkpoint and workload."""
    if not fp8:
        return []
    out = ["", "## tokenmill fp8 (e4m3 weights, per-token activations) against bf16", ""]
    out += [f"KV plan (fp8): {fp8.get('kv_plan')}", ""]
    out += ["| metric | fp8 | bf16 | fp8 / bf16 |", "| --- | --- | --- | --- |"]
    pairs = [
        ("batch-1 decode tok/s", _get(fp8, "batch1", "decode_tok_s"), _get(bf16, "batch1", "decode_tok_s"))
    ]
    for c, t in (_get(fp8, "throughput") or {}).items():
        pairs.append(
            (f"{c} concurrent, output tok/s", t["output_tok_s"], _get(bf16, "throughput", c, "output_tok_s"))
        )
    for label, a, b in pairs:
        out.append(f"| {label} | {_fmt(a, '.1f')} | {_fmt(b, '.1f')} | {_ratio(a, b)} |")
    return out


def _parity(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["", "## Greedy parity with transformers (same device, same weights)", ""]
    out += [
        "| arch | dtype | exact | prefix match | first divergence per prompt |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['arch']} | {r['dtype']} | {r['exact']}/{r['prompts']} | {r['match_fraction']:.3f} "
            f"| {r['first_divergence']} |"
        )
    return out


def _performance(meta: dict[str, Any], tm: dict[str, Any] | None, hf: dict[str, Any] | None) -> list[str]:
    if not tm and not hf:
        return []
    work = meta.get("workload", {})
    peak = meta.get("peak_bw", 0) / 1e12
    out = ["", f"## {_get(meta, 'shape', 'name')}: tokenmill vs transformers (bf16)", ""]
    if tm:
        out += [f"KV plan: {tm.get('kv_plan')}", ""]
    out += ["| metric | tokenmill | transformers | ratio |", "| --- | --- | --- | --- |"]

    def row(label: str, a: Any, b: Any, spec: str, higher_better: bool = True) -> None:
        ratio = _ratio(a, b) if higher_better else _ratio(b, a)
        out.append(f"| {label} | {_fmt(a, spec)} | {_fmt(b, spec)} | {ratio} |")

    row("start-up / load (s)", _get(tm, "startup_s"), _get(hf, "load_s"), ".2f", higher_better=False)
    for key, label, spec in (
        ("decode_tok_s", "batch-1 decode tok/s", ".1f"),
        ("decode_step_ms", "batch-1 decode step (ms)", ".2f"),
        ("end_to_end_tok_s", f"batch-1 tok/s end to end ({work.get('decode_tokens')} tokens)", ".1f"),
        ("prefill_plus_first_token_s", f"prefill {work.get('prompt_len')} + 1 token (s)", ".4f"),
        ("bandwidth_tb_s", "decode bandwidth (TB/s)", ".2f"),
        ("bandwidth_utilization", f"of {peak:.1f} TB/s", ".1%"),
    ):
        lower_better = key in ("decode_step_ms", "prefill_plus_first_token_s")
        row(label, _get(tm, "batch1", key), _get(hf, "batch1", key), spec, not lower_better)
    hf_batch = _get(hf, "static_batch", "requests") or work.get("hf_batch")
    throughput = _get(tm, "throughput") or {}
    for c, t in throughput.items():
        peer = _get(hf, "static_batch", "output_tok_s") if str(c) == str(hf_batch) else None
        label = f"{c} concurrent, output tok/s" + (" (transformers: one static batch)" if peer else "")
        row(label, t["output_tok_s"], peer, ".0f")
    if str(hf_batch) not in throughput and _get(hf, "static_batch"):
        row(f"{hf_batch} concurrent, output tok/s", None, _get(hf, "static_batch", "output_tok_s"), ".0f")
    ratio_note = "ratio is tokenmill's advantage: >1x means tokenmill is faster"
    return [*out, "", f"Prompts {work.get('prompt_len')} random ids, greedy, ignore_eos; {ratio_note}."]
