"""Greedy parity with transformers on the benchmark device, for tiny random Llama, Qwen2, Qwen3.

Each checkpoint is built by transformers from a config (tests/tiny_models.py)
and saved in the dtype under test, so both sides read the same weights.
transformers generates each prompt alone (no padding); tokenmill generates all
of them in one continuous batch. fp32 should match exactly; bf16 may drift
late, so the first diverging index is reported, not just a yes or no. The last
two prompts share the longest one's first 96 tokens: tokenmill serves that
prefix from its prefix cache (blocks computed in the same step) and attends
both in one batched prefill, which this checks against transformers on the
device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3")
PROMPT_LENGTHS = (6, 23, 57, 110)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first differing token, None when the sequences are equal."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def parity_prompts(tokenizer_dir: Path) -> list[list[int]]:
    from tests.tiny_models import training_text
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = training_text()
    prompts = []
    for i, n in enumerate(PROMPT_LENGTHS):
        ids = tok.encode(text[i * 5000 : i * 5000 + 8 * n]).ids
        prompts.append(ids[:n])
    shared = prompts[-1][:96]
    prompts += [shared + prompts[0][:6] + prompts[1][:2], shared + prompts[1][:8]]
    return prompts


def _ours(
    folder: Path, dtype: str, device: torch.device, prompts: list[list[int]], n: int
) -> list[list[int]]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        dtype=dtype,
        device=str(device),
        max_model_len=512,
        max_num_seqs=len(prompts),
        kv_cache_memory=64 << 20,
    )
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    return [list(o.outputs[0].token_ids) for o in outs]


def _theirs(
    folder: Path, dtype: torch.dtype, device: torch.device, prompts: list[list[int]], n: int
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    return [hf_greedy(model, [p], n, device)[0].tolist() for p in prompts]


def hf_greedy(model: Any, batch: list[list[int]], n: int, device: torch.device) -> torch.Tensor:
    """transformers' greedy continuation of equal-length prompts: exactly ``n`` new ids each."""
    ids = torch.tensor(batch, device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]


def run_parity(
    rows: list[dict[str, Any]], tmp: Path, device: torch.device, new_tokens: int, log: Callable[[str], None]
) -> None:
    """Append one row per (dtype, arch) to ``rows`` as each finishes."""
    from tests.tiny_models import build_tiny_model, build_tokenizer

    tok_dir = build_tokenizer(tmp / "tokenizer")
    prompts = parity_prompts(tok_dir)
    for dtype_name, dtype in DTYPES.items():
        for arch in ARCHS:
            start = time.perf_counter()
            folder = build_tiny_model(tmp / f"{arch}-{dtype_name}", arch, tok_dir, dtype=dtype)
            ours = _ours(folder, dtype_name, device, prompts, new_tokens)
            theirs = _theirs(folder, dtype, device, prompts, new_tokens)
            divs = [first_divergence(a, b) for a, b in zip(ours, theirs, strict=True)]
            matched = [new_tokens if d is None else d for d in divs]
            row = {
                "arch": arch,
                "dtype": dtype_name,
                "prompts": len(prompts),
                "exact": sum(d is None for d in divs),
                "match_fraction": sum(matched) / (new_tokens * len(prompts)),
                "first_divergence": divs,
                "new_tokens": new_tokens,
                "seconds": round(time.perf_counter() - start, 2),
            }
            rows.append(row)
            log(
                f"  {arch:6s} {dtype_name:8s} exact {row['exact']}/{row['prompts']}  "
                f"prefix match {row['match_fraction']:.3f}  first divergence {divs}  ({row['seconds']} s)"
            )
