"""tokenmill and transformers on the same checkpoint: start-up, batch-1 decode, throughput.

Every prompt is fresh random ids, so tokenmill's prefix cache never hits and
both engines do the same work. Pure decode time per step is
(T(n tokens) - T(1 token)) / (n - 1) on one request, which leaves prefill out;
bandwidth utilisation is what that step must read (weights, except the
embedding table of which it reads a row, plus the KV of its context) over that
time, against a practical peak.
"""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu_checkpoint import LlamaShape
from gpu_parity import hf_greedy

Log = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 128
    decode_tokens: int = 256  # batch-1 output length
    concurrency: tuple[int, ...] = (64, 256)
    output_len: int = 128  # output length in the throughput runs
    hf_batch: int = 64  # transformers' static batch
    max_model_len: int = 1024
    kv_cache_bytes: int = 16 << 30


class Prompts:
    """Fresh random prompts of equal length, never repeated."""

    def __init__(self, vocab_size: int, length: int, seed: int):
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.length = length

    def take(self, n: int) -> list[list[int]]:
        return [[self.rng.randrange(8, self.vocab_size) for _ in range(self.length)] for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def decode_stats(shape: LlamaShape, work: Workload, t_one: float, t_all: float, peak_bw: float) -> dict:
    """Batch-1 figures from the time to generate 1 token and ``decode_tokens`` tokens."""
    n = work.decode_tokens
    step = (t_all - t_one) / (n - 1)
    mean_context = work.prompt_len + (n - 1) / 2
    read = shape.decode_weight_bytes + shape.kv_bytes_per_token * mean_context
    return {
        "prefill_plus_first_token_s": t_one,
        "generate_s": t_all,
        "end_to_end_tok_s": n / t_all,
        "decode_step_ms": step * 1e3,
        "decode_tok_s": 1 / step,
        "bytes_read_per_step": read,
        "bandwidth_tb_s": read / step / 1e12,
        "bandwidth_utilization": read / step / peak_bw,
    }


def bench_tokenmill(
    res: dict[str, Any],
    folder: Path,
    shape: LlamaShape,
    work: Workload,
    device: torch.device,
    peak_bw: float,
    log: Log,
    quantization: str | None = None,
) -> None:
    """Fill ``res`` as figures come in, so a failure late in the run keeps the early ones.
    ``quantization``: the engine's (``fp8``: e4m3 weights, ``torch._scaled_mm`` on Hopper)."""
    from tokenmill import LLM, SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)

    prompts = Prompts(shape.vocab_size, work.prompt_len, seed=1)
    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        dtype="bfloat16",
        device=str(device),
        max_model_len=work.max_model_len,
        max_num_seqs=max(work.concurrency),
        kv_cache_memory=work.kv_cache_bytes,
        quantization=quantization,
    )
    res["quantization"] = quantization
    res["startup_s"] = time.perf_counter() - start
    res["engine_startup_s"] = llm.engine.startup_seconds
    res["kv_plan"] = llm.kv_plan.summary()
    if device.type == "cuda":
        res["gpu_allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
    log(f"  start-up {res['startup_s']:.2f} s; {res['kv_plan']}")
    # The engine goes with this frame; on an error its traceback holds it until the
    # runner has handled that error and freed GPU memory.
    res["warmup_s"], _ = _timed(device, lambda: llm.generate(prompts.take(4), params(8)))
    log(f"  warm-up (4 requests x 8 tokens) {res['warmup_s']:.2f} s")
    t_one, _ = _timed(device, lambda: llm.generate(prompts.take(1), params(1)))
    t_all, outs = _timed(device, lambda: llm.generate(prompts.take(1), params(work.decode_tokens)))
    assert len(outs[0].outputs[0].token_ids) == work.decode_tokens, "batch-1 output has the wrong length"
    res["batch1"] = decode_stats(shape, work, t_one, t_all, peak_bw)
    b = res["batch1"]
    log(
        f"  batch 1: {b['decode_tok_s']:.1f} tok/s decode ({b['decode_step_ms']:.2f} ms/step, "
        f"{b['bandwidth_utilization']:.1%} of peak bandwidth), {b['end_to_end_tok_s']:.1f} tok/s "
        f"end to end, prefill+1 {t_one * 1e3:.1f} ms"
    )
    res["throughput"] = {}
    for c in work.concurrency:
        batch = prompts.take(c)
        secs, outs = _timed(device, lambda batch=batch: llm.generate(batch, params(work.output_len)))
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        res["throughput"][str(c)] = {
            "requests": c,
            "seconds": secs,
            "output_tokens": generated,
            "output_tok_s": generated / secs,
            "total_tok_s": (generated + c * work.prompt_len) / secs,
        }
        log(f"  {c} concurrent: {generated / secs:.0f} output tok/s ({generated} tokens in {secs:.2f} s)")
    if device.type == "cuda":
        res["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def _load_transformers(folder: Path, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # device_map needs accelerate; without it, load on the host and move.
    if device.type == "cuda" and importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, device_map=str(device))
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).to(device)


def bench_transformers(
    res: dict[str, Any],
    folder: Path,
    shape: LlamaShape,
    work: Workload,
    device: torch.device,
    peak_bw: float,
    log: Log,
) -> None:
    """Fill ``res`` as figures come in, so a failure late in the run keeps the early ones."""
    prompts = Prompts(shape.vocab_size, work.prompt_len, seed=2)
    start = time.perf_counter()
    model = _load_transformers(folder, device).eval()
    _sync(device)
    res["load_s"] = time.perf_counter() - start
    log(f"  from_pretrained + to device {res['load_s']:.2f} s")

    def generate(batch: list[list[int]], n: int) -> torch.Tensor:
        return hf_greedy(model, batch, n, device)

    res["warmup_s"], _ = _timed(device, lambda: generate(prompts.take(4), 8))
    t_one, _ = _timed(device, lambda: generate(prompts.take(1), 1))
    t_all, out = _timed(device, lambda: generate(prompts.take(1), work.decode_tokens))
    assert out.shape[1] == work.decode_tokens, "batch-1 output has the wrong length"
    res["batch1"] = decode_stats(shape, work, t_one, t_all, peak_bw)
    b = res["batch1"]
    log(
        f"  batch 1: {b['decode_tok_s']:.1f} tok/s decode ({b['decode_step_ms']:.2f} ms/step, "
        f"{b['bandwidth_utilization']:.1%} of peak bandwidth)"
    )
    batch = prompts.take(work.hf_batch)
    secs, out = _timed(device, lambda: generate(batch, work.output_len))
    generated = out.shape[0] * out.shape[1]
    res["static_batch"] = {
        "requests": work.hf_batch,
        "seconds": secs,
        "output_tokens": generated,
        "output_tok_s": generated / secs,
        "total_tok_s": (generated + work.hf_batch * work.prompt_len) / secs,
    }
    log(f"  static batch {work.hf_batch}: {generated / secs:.0f} output tok/s ({secs:.2f} s)")
