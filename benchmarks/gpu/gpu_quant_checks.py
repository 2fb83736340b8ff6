"""Pre-quantized checkpoints on the benchmark device (issue 9).

On a small random Llama whose layers are whole 128x128 blocks:

- ``tokenmill quantize``'s fp8 folder (compressed-tensors, row scales) loads
  without re-quantizing and gives the same logits as ``--quantization fp8``;
- a block-wise fp8 folder in DeepSeek's layout loads; the step records whether
  the device's ``scaled_mm`` took the 128x128 block scales (probed at load) or
  the layer fell back to the float32 reference, and how far the logits are from
  the dense model holding the same dequantized weights;
- the fp8 KV cache (``kv_cache_dtype="fp8"``) against the bf16 cache.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PROMPTS = [[5, 17, 99, 203, 41, 7, 300, 12, 8], [44, 45, 46, 47, 48, 49]]
BLOCK = (128, 128)


def run_quant_checks(
    info: dict[str, Any], tmp: Path, device: torch.device, log: Callable[[str], None]
) -> None:
    from safetensors.torch import load_file, save_file
    from tests.tiny_models import build_tiny_model, build_tokenizer

    from tokenmill.engine import Engine, EngineConfig
    from tokenmill.engine.fp8 import quantize_fp8_blocks
    from tokenmill.engine.models.quantized import Fp8Weights
    from tokenmill.engine.quantization import QuantizedWeight, dequantize_weight
    from tokenmill.engine.quantized_checkpoint_writer import save_quantized
    from tokenmill.engine.scoring import prompt_logits

    def engine(folder: Path, **kwargs: Any) -> Engine:
        config = EngineConfig(model=str(folder), device=str(device), dtype="bfloat16", **kwargs)
        return Engine(config)

    def logits(e: Engine) -> torch.Tensor:
        return prompt_logits(e, PROMPTS)[0].float().cpu()

    start = time.perf_counter()
    tok = build_tokenizer(tmp / "tokenizer")
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2, "num_key_value_heads": 1}
    dense = build_tiny_model(tmp / "dense", "llama", tok, dtype=torch.bfloat16, **shape)

    saved = save_quantized(dense, tmp / "fp8-saved", "fp8", torch.bfloat16).out
    same = torch.equal(logits(engine(saved)), logits(engine(dense, quantization="fp8")))
    info["saved_fp8_same_logits_as_at_load"] = same
    log(f"  saved fp8 folder: logits {'equal to' if same else 'UNLIKE'} --quantization fp8 at load")

    block_dir, reference_dir = tmp / "fp8-block", tmp / "fp8-block-dense"
    shutil.copytree(dense, block_dir)
    shutil.copytree(dense, reference_dir)
    tensors, reference = {}, {}
    for name, w in load_file(str(dense / "model.safetensors")).items():
        if ".layers." in name and name.endswith("_proj.weight"):
            q, scales = quantize_fp8_blocks(w, BLOCK)
            module = name.removesuffix(".weight")
            tensors |= {f"{module}.weight": q, f"{module}.weight_scale_inv": scales}
            qw = QuantizedWeight("fp8", q, scales, block=BLOCK, activations="group")
            reference[name] = dequantize_weight(qw, torch.bfloat16)
        else:
            tensors[name] = reference[name] = w
    save_file(tensors, str(block_dir / "model.safetensors"))
    save_file(reference, str(reference_dir / "model.safetensors"))
    config = json.loads((block_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    (block_dir / "config.json").write_text(json.dumps(config))
    blocked = engine(block_dir)
    kernels = [m for m in blocked.model.modules() if isinstance(m, Fp8Weights)]
    info["block_fp8_layers"] = len(kernels)
    info["block_fp8_kernel"] = "scaled_mm" if all(k.use_kernel for k in kernels) else "float32 reference"
    got, want = logits(blocked), logits(engine(reference_dir))
    info["block_fp8_relative_logit_error"] = round(((got - want).norm() / want.norm()).item(), 4)
    # The fp8 KV cache on this device: logits scored 4 tokens at a time, so every chunk reads its context
    # back from the cache, against the bf16 cache.
    full = prompt_logits(engine(dense), PROMPTS, chunk_size=4)[0].float().cpu()
    fp8_kv = prompt_logits(engine(dense, kv_cache_dtype="fp8"), PROMPTS, chunk_size=4)[0].float().cpu()
    info["fp8_kv_relative_logit_error"] = round(((fp8_kv - full).norm() / full.norm()).item(), 4)
    log(f"  fp8 KV cache: relative logit error {info['fp8_kv_relative_logit_error']} against the bf16 cache")
    info["seconds"] = round(time.perf_counter() - start, 2)
    log(
        f"  block fp8 (DeepSeek layout): {len(kernels)} layers on {info['block_fp8_kernel']}, relative logit "
        f"error {info['block_fp8_relative_logit_error']} against the dequantized dense model"
    )
