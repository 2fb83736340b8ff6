"""A random Llama checkpoint of a given shape, written in seconds.

Tensors are drawn on the benchmark device from a seeded generator (std 0.02,
norms at one), copied to host and saved as sharded safetensors with an index,
a config.json that transformers 4.x and 5.x both read, and the demo model's
tokenizer. Throughput depends on shapes, not values, so random weights measure
the work of trained ones; prompts are token ids, so ids beyond the tokenizer's
vocabulary do no harm.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BF16_BYTES = 2


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Hugging Face tensor names and shapes, in checkpoint order."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab_size, h))]
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    @property
    def num_params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the embedding table, of which it reads a row."""
        return (self.num_params - self.vocab_size * self.hidden_size) * BF16_BYTES

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BF16_BYTES

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            # Both spellings: 4.x reads rope_theta/torch_dtype, 5.x rope_parameters/dtype.
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 4,
            "use_cache": True,
        }


LLAMA3_8B = LlamaShape("llama3-8b", 4096, 14336, 32, 32, 8, 128256)
TINY = LlamaShape("tiny", 256, 512, 2, 4, 2, 8192)
SHAPES = {s.name: s for s in (LLAMA3_8B, TINY)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shard_plan(shape: LlamaShape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        nbytes = _numel(dims) * BF16_BYTES
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def write_checkpoint(
    out: Path,
    shape: LlamaShape,
    device: torch.device,
    tokenizer_dir: Path,
    seed: int = 0,
    std: float = 0.02,
    shard_bytes: int = 4 << 30,
) -> dict[str, Any]:
    """Write the checkpoint into ``out``; returns sizes and timings."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    plan = _shard_plan(shape, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(plan, 1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        host: dict[str, torch.Tensor] = {}
        for name, dims in group:
            if len(dims) == 1:
                t = torch.ones(dims, dtype=torch.bfloat16, device=device)
            else:
                t = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen)
            host[name] = t.cpu()
            weight_map[name] = fname
            total += t.numel() * BF16_BYTES
        save_file(host, str(out / fname), metadata={"format": "pt"})
        del host
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return {
        "path": str(out),
        "num_params": shape.num_params,
        "bytes": total,
        "num_shards": len(plan),
        "seconds": time.perf_counter() - start,
    }
