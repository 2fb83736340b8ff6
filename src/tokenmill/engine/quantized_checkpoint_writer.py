"""Writing a quantized checkpoint (``tokenmill quantize``): compressed-tensors, the layout llm-compressor
writes for the same scheme, so vLLM can serve what tokenmill quantized and tokenmill loads it without
re-quantizing (quantized_checkpoint.py reads it back).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenmill.engine.errors import InvalidRequestError, ModelLoadError
from tokenmill.engine.quantization import (
    QUANTIZATION_METHODS,
    QuantizedWeight,
    model_int4_group,
    quantize_weight,
)
from tokenmill.engine.quantized_checkpoint import pack_int32, read_checkpoint_quantization
from tokenmill.engine.weights import INDEX_FILE, read_tensors, safetensors_files, tensor_shapes

SHARD_BYTES = 4 << 30

_LINEAR_WEIGHT = re.compile(r"(^|\.)layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight$")


@dataclass(frozen=True)
class SaveReport:
    method: str
    quantized_layers: int
    plain_layers: list[str]  # linear layers left in the model dtype (int4 with no fitting group size)
    bytes_before: int
    bytes_after: int
    out: Path


def save_quantized(src: Path, out: Path, method: str, dtype: torch.dtype) -> SaveReport:
    """Quantize ``src``'s linear layers (all but the LM head, as at load) and write a compressed-tensors
    checkpoint to ``out``, with the other files copied. Raises ModelLoadError for a checkpoint already
    quantized, ValueError for an unknown method, InvalidRequestError for int4 on a model it cannot
    quantize at all."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"method={method!r} is invalid: allowed {', '.join(QUANTIZATION_METHODS)}")
    existing = read_checkpoint_quantization(src)
    if existing is not None:
        raise ModelLoadError(
            f"{src} is already quantized ({existing.source}): quantize the full-precision model"
        )
    files = safetensors_files(src)
    group = model_int4_group(_linear_in_features(files)) if method == "int4" else None
    if method == "int4" and group is None:
        # Refused rather than written: every layer would stay plain, and compressed-tensors has no
        # group_size to state for a model without one (the config would not load).
        raise InvalidRequestError(
            "method",
            method,
            "int8 or fp8",
            message=f"method int4 would leave {src} plain: no linear layer's input size is divisible by "
            "32, 64 or 128 (int4's group sizes); use int8 or fp8",
        )
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out)
    quantized, plain, before = 0, [], 0
    for file in files:
        for name, tensor in read_tensors(file):
            before += tensor.numel() * tensor.element_size()
            qw = quantize_weight(tensor.to(dtype), method, group) if _LINEAR_WEIGHT.search(name) else None
            if qw is None:
                if _LINEAR_WEIGHT.search(name):
                    plain.append(name.removesuffix(".weight"))
                # In the dtype quantized from, which config.json states: served as it is, the folder
                # computes in it, as --quantization METHOD --dtype DTYPE does on the original.
                writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                continue
            module = name.removesuffix(".weight")
            for local, t in encode(qw).items():
                writer.add(f"{module}.{local}", t)
            quantized += 1
    after = writer.close()
    _copy_other_files(src, out)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = compressed_tensors_config(method, group, ["lm_head", *plain])
    _record_dtype(config, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return SaveReport(method, quantized, plain, before, after, out)


def _record_dtype(config: dict[str, Any], dtype: torch.dtype) -> None:
    """State ``dtype`` in config.json under the spellings it already has (transformers 4.x writes
    ``torch_dtype``, 5.x ``dtype``), or as ``torch_dtype``, which both read."""
    name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]:
        config[key] = name


def _linear_in_features(files: list[Path]) -> list[int]:
    shapes = [tensor_shapes(file) for file in files]
    return [int(shape[1]) for found in shapes for name, shape in found.items() if _LINEAR_WEIGHT.search(name)]


def encode(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """A layer's compressed-tensors tensors (local names). Scales stay float32 whatever the model
    dtype: quantizing at load keeps them so, and a bfloat16 copy would round them (vLLM casts them to
    its own dtype as it reads them)."""
    rows, cols = qw.shape
    if qw.method == "fp8":
        return {"weight": qw.q.contiguous(), "weight_scale": qw.scales.float().reshape(rows, 1).contiguous()}
    bits = 8 if qw.method == "int8" else 4
    tensors = {
        "weight_packed": pack_int32(qw.q, bits),
        "weight_scale": qw.scales.float().reshape(rows, -1).contiguous(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if qw.zero_points is not None:  # packed along the rows (dim 0), as compressed-tensors does
        tensors["weight_zero_point"] = pack_int32(qw.zero_points.t(), bits).t().contiguous()
    return tensors


def compressed_tensors_config(method: str, group: int | None, ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` for what ``encode`` writes: the scheme llm-compressor states for it."""
    if method == "fp8":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}
        acts: dict[str, Any] | None = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        }
        fmt = "float-quantized"
    elif method == "int8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
        acts, fmt = None, "pack-quantized"
    else:
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": False,
            "strategy": "group",
            "group_size": group,
            "dynamic": False,
        }
        acts, fmt = None, "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


class _ShardWriter:
    """Writes tensors to safetensors shards of at most SHARD_BYTES, with an index when there are several."""

    def __init__(self, out: Path):
        self.out = out
        self.shards: list[dict[str, torch.Tensor]] = [{}]
        self.size = 0
        self.total = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.size and self.size + nbytes > SHARD_BYTES:
            self._flush()
        self.shards[-1][name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.shards[-1], str(path), metadata={"format": "pt"})
        path.chmod(0o644)  # safetensors writes owner-only files; weights are for every worker to read
        self.written.append((path, list(self.shards[-1])))
        self.shards[-1] = {}
        self.size = 0

    def close(self) -> int:
        """Give the shards their final names; returns the bytes written."""
        self._flush()
        for stale in [*self.out.glob("*.safetensors"), self.out / INDEX_FILE]:
            if not stale.name.startswith(".shard-"):
                stale.unlink(missing_ok=True)
        if len(self.written) == 1:
            self.written[0][0].rename(self.out / "model.safetensors")
            return self.total
        n = len(self.written)
        weight_map = {}
        for i, (path, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return self.total


def _copy_other_files(src: Path, out: Path) -> None:
    """Tokenizer, chat template, generation config...: everything but the weights and config.json."""
    for item in src.iterdir():
        if item.name in ("config.json", INDEX_FILE) or item.suffix == ".safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
