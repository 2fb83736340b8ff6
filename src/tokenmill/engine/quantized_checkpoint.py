"""Checkpoints whose weights are already quantized: reading the published formats, and writing one.

Read, as published on the Hugging Face hub (``quantization_config`` in config.json):

- compressed-tensors (llm-compressor's output, what vLLM reads): fp8 weights
  (``float-quantized``) with one scale per row, per tensor or per block, and
  activations dynamic per token, static per tensor, or none; int8 and int4
  weight-only (``pack-quantized``, or ``int-quantized``/``naive-quantized``
  int8), int4 group-wise, symmetric or with zero points.
- block-wise fp8 in DeepSeek's layout (``quant_method: fp8`` with
  ``weight_block_size``; DeepSeek-V3, Qwen3-FP8): ``weight`` in e4m3 and
  ``weight_scale_inv`` per block, which despite its name multiplies.

Whether a tensor is quantized is read from the tensors themselves (a scale
next to it, or a float8/int8 dtype), not from the config's ``targets`` and
``ignore`` patterns: the two must agree in a valid checkpoint, and the tensors
cannot be wrong about themselves.

Written by ``quantized_checkpoint_writer.py`` (``tokenmill quantize``) in
compressed-tensors' layout, so what tokenmill quantized loads here, and in
vLLM, without re-quantizing.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tokenmill.engine.errors import ModelLoadError
from tokenmill.engine.quantization import (
    QuantizedWeight,
)
from tokenmill.engine.weights import safetensors_files

logger = logging.getLogger(__name__)

CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Per-module tensor names that only quantized layers carry.
_MARKERS = (
    "weight_scale",
    "weight_packed",
    "weight_scale_inv",
    "weight_zero_point",
    "weight_shape",
    "input_scale",
)
# KV cache scales of checkpoints calibrated for an fp8 cache: the engine computes its own (kv_cache_dtype).
_KV_SCALES = re.compile(r"\.(k_scale|v_scale|q_scale|prob_scale)$|\.(k_proj|v_proj)\.output_scale$")


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's linear layers are quantized (one scheme for all of them)."""

    method: str  # int8 | int4 | fp8
    source: str  # the format, for messages: "compressed-tensors pack-quantized", "fp8 block-wise"
    num_bits: int
    strategy: str  # channel | tensor | group | block
    group: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    activations: str = "none"  # token | tensor | group | none (see QuantizedWeight)


def read_checkpoint_quantization(folder: Path) -> CheckpointQuantization | None:
    """The scheme of ``folder``'s checkpoint, or None when its weights are plain."""
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # ModelConfig reports an unreadable config.json
    config = raw.get("quantization_config") or raw.get("compression_config")
    return None if not config else parse_quantization_config(config)


def parse_quantization_config(config: dict[str, Any]) -> CheckpointQuantization:
    """Raises ModelLoadError naming the field and what is supported."""
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _parse_compressed_tensors(config)
    if method == "fp8":
        return _parse_block_fp8(config)
    raise ModelLoadError(
        f"quantization_config.quant_method={method!r} is not supported: supported are "
        "'compressed-tensors' (fp8, int8, int4) and 'fp8' (block-wise, DeepSeek's layout)"
    )


def _parse_block_fp8(config: dict[str, Any]) -> CheckpointQuantization:
    block = config.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelLoadError(
            f"quantization_config.weight_block_size={block!r} is not supported: fp8 checkpoints need "
            "two positive block sizes, e.g. [128, 128] (per-tensor fp8 is read from compressed-tensors)"
        )
    if config.get("activation_scheme", "dynamic") != "dynamic":
        raise ModelLoadError(
            f"quantization_config.activation_scheme={config['activation_scheme']!r} is not supported "
            "with block-wise fp8: supported is 'dynamic'"
        )
    if config.get("fmt", "e4m3") != "e4m3":
        raise ModelLoadError(
            f"quantization_config.fmt={config['fmt']!r} is not supported: supported is 'e4m3'"
        )
    return CheckpointQuantization(
        "fp8", "fp8 block-wise", 8, "block", block=(block[0], block[1]), activations="group"
    )


def _parse_compressed_tensors(config: dict[str, Any]) -> CheckpointQuantization:
    fmt = config.get("format")
    groups = config.get("config_groups") or {}
    schemes = {
        json.dumps({k: g.get(k) for k in ("weights", "input_activations")}, sort_keys=True)
        for g in groups.values()
    }
    if len(schemes) != 1:
        raise ModelLoadError(
            f"quantization_config.config_groups has {len(schemes)} different schemes: supported is one "
            "scheme for every quantized layer"
        )
    name, group = next(iter(groups.items()))
    where = f"quantization_config.config_groups.{name}"
    fmt = group.get("format") or fmt
    if fmt not in CT_FORMATS:
        raise ModelLoadError(
            f"quantization_config.format={fmt!r} is not supported: supported are {', '.join(CT_FORMATS)}"
        )
    weights = group.get("weights") or {}
    kind, bits = weights.get("type"), weights.get("num_bits")
    strategy = weights.get("strategy")
    symmetric = bool(weights.get("symmetric", True))
    acts = group.get("input_activations")
    source = f"compressed-tensors {fmt}"
    if kind == "float" and bits == 8:
        return _ct_fp8(where, weights, strategy, acts, source)
    if kind == "int" and bits in (4, 8):
        if acts is not None:
            raise ModelLoadError(
                f"{where}.input_activations={acts!r} is not supported with int weights: supported is "
                "null (weight-only int8 and int4)"
            )
        if bits == 8:
            if strategy != "channel" or not symmetric:
                raise ModelLoadError(
                    f"{where}.weights: int8 with strategy={strategy!r}, symmetric={symmetric} is not "
                    "supported: supported is strategy 'channel', symmetric"
                )
            return CheckpointQuantization("int8", source, 8, "channel")
        size = weights.get("group_size")
        if strategy != "group" or size not in INT4_KERNEL_GROUPS:
            raise ModelLoadError(
                f"{where}.weights: int4 with strategy={strategy!r}, group_size={size!r} is not supported: "
                "supported is strategy 'group' with group_size one of "
                f"{', '.join(map(str, INT4_KERNEL_GROUPS))}"
            )
        return CheckpointQuantization("int4", source, 4, "group", group=size, symmetric=symmetric)
    raise ModelLoadError(
        f"{where}.weights: type={kind!r}, num_bits={bits!r} is not supported: supported are float 8 (fp8), "
        "int 8 and int 4"
    )


def _ct_fp8(
    where: str, weights: dict[str, Any], strategy: str | None, acts: dict[str, Any] | None, source: str
) -> CheckpointQuantization:
    block = None
    if strategy == "block":
        structure = weights.get("block_structure")
        if not (isinstance(structure, list) and len(structure) == 2):
            raise ModelLoadError(
                f"{where}.weights.block_structure={structure!r} is not supported: need [rows, cols]"
            )
        block = (int(structure[0]), int(structure[1]))
    elif strategy not in ("channel", "tensor"):
        raise ModelLoadError(
            f"{where}.weights.strategy={strategy!r} is not supported for fp8: "
            "supported are channel, tensor, block"
        )
    if acts is None:
        activations = "none"
    elif block is not None and acts.get("dynamic") and acts.get("strategy") in ("group", "token"):
        activations = "group"  # per token and per block column: finer than per token, what the kernel takes
    elif block is None and acts.get("dynamic") is True and acts.get("strategy") == "token":
        activations = "token"
    elif block is None and acts.get("dynamic") is False and acts.get("strategy") == "tensor":
        activations = "tensor"
    else:
        raise ModelLoadError(
            f"{where}.input_activations={acts!r} is not supported: supported are null, dynamic per token, "
            "static per tensor, and (with block weights) dynamic per group"
        )
    return CheckpointQuantization("fp8", source, 8, strategy, block=block, activations=activations)


# -- reading ---------------------------------------------------------------------------


def iter_quantized_checkpoint(
    folder: Path, dtype: torch.dtype, device: torch.device, scheme: CheckpointQuantization
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Yield (name, tensor) for plain tensors, cast to ``dtype``, and (``MODULE.weight``,
    QuantizedWeight) for quantized layers, once all of a layer's tensors were read (they may span
    shards)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    skipped = 0
    for file in safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if _KV_SCALES.search(name):
                        skipped += 1
                        continue
                    module, _, local = name.rpartition(".")
                    tensor = f.get_tensor(name)
                    if module in pending or local in _MARKERS or _is_quantized_dtype(tensor):
                        pending.setdefault(module, {})[local] = tensor
                    else:
                        yield name, tensor.to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read {file}: {e} (is the file complete?)") from e
        for module in [m for m, tensors in pending.items() if _complete(tensors, scheme)]:
            yield from _decoded(module, pending.pop(module), scheme, dtype)
    for module, tensors in pending.items():  # incomplete: decoding names what is missing
        yield from _decoded(module, tensors, scheme, dtype)
    if skipped:
        logger.info("ignored %d KV cache scales of the checkpoint: the engine computes its own", skipped)


def _is_quantized_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.int8, torch.int32)


def _required(scheme: CheckpointQuantization) -> set[str]:
    if scheme.source == "fp8 block-wise":
        return {"weight", "weight_scale_inv"}
    if scheme.source.endswith("pack-quantized"):
        return {"weight_packed", "weight_scale", "weight_shape"} | (
            set() if scheme.symmetric else {"weight_zero_point"}
        )
    return {"weight", "weight_scale"} | ({"input_scale"} if scheme.activations == "tensor" else set())


def _complete(tensors: dict[str, torch.Tensor], scheme: CheckpointQuantization) -> bool:
    return _required(scheme) <= tensors.keys()


def _decoded(
    module: str, tensors: dict[str, torch.Tensor], scheme: CheckpointQuantization, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The layer's QuantizedWeight, then its other tensors (a bias) as plain ones."""
    missing = _required(scheme) - tensors.keys()
    if missing:
        raise ModelLoadError(
            f"checkpoint layer {module!r} lacks {', '.join(sorted(missing))} ({scheme.source} needs "
            f"{', '.join(sorted(_required(scheme)))})"
        )
    try:
        qw = decode(tensors, scheme)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadError(f"checkpoint layer {module!r}: {e}") from e
    yield f"{module}.weight", qw
    for local, tensor in tensors.items():
        if local not in _MARKERS and local != "weight":
            yield f"{module}.{local}", tensor.to(dtype=dtype)


def decode(tensors: dict[str, torch.Tensor], scheme: CheckpointQuantization) -> QuantizedWeight:
    """One layer's checkpoint tensors (local names: ``weight``, ``weight_scale``, ...) as a
    QuantizedWeight, without re-quantizing."""
    if scheme.source == "fp8 block-wise":
        return _fp8(tensors["weight"], tensors["weight_scale_inv"], scheme, None)
    if scheme.source.endswith("pack-quantized"):
        rows, cols = (int(n) for n in tensors["weight_shape"].tolist())
        q = unpack_int32(tensors["weight_packed"], scheme.num_bits, cols)
        if q.shape[0] != rows:
            raise ValueError(f"weight_packed has {q.shape[0]} rows, weight_shape says {rows}")
    else:
        q = tensors["weight"]
    if scheme.method == "fp8":
        return _fp8(q, tensors["weight_scale"], scheme, tensors.get("input_scale"))
    if q.dtype != torch.int8:
        raise ValueError(f"weight has dtype {q.dtype}, expected int8 for {scheme.source}")
    scales = tensors["weight_scale"].float()
    if scheme.method == "int8":
        return QuantizedWeight("int8", q, scales.reshape(-1))
    assert scheme.group is not None
    groups = -(-q.shape[1] // scheme.group)
    if q.shape[1] % scheme.group or tuple(scales.shape) != (q.shape[0], groups):
        raise ValueError(
            f"weight_scale has shape {tuple(scales.shape)}, expected {(q.shape[0], groups)} "
            f"for group size {scheme.group}"
        )
    zero_points = None
    if not scheme.symmetric:
        zero_points = (
            unpack_int32(tensors["weight_zero_point"].t(), scheme.num_bits, q.shape[0]).t().contiguous()
        )
    return QuantizedWeight("int4", q, scales, zero_points, group=scheme.group)


def _fp8(
    q: torch.Tensor, scale: torch.Tensor, scheme: CheckpointQuantization, input_scale: torch.Tensor | None
) -> QuantizedWeight:
    if q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight has dtype {q.dtype}, expected float8_e4m3fn for {scheme.source}")
    rows, cols = q.shape
    scale = scale.float()
    if scheme.block is not None:
        b0, b1 = scheme.block
        want = (-(-rows // b0), -(-cols // b1))
        if tuple(scale.shape) != want:
            raise ValueError(f"the block scales have shape {tuple(scale.shape)}, expected {want}")
        if cols % b1:
            raise ValueError(f"{cols} inputs are not a whole number of {b1}-input blocks")
        return QuantizedWeight("fp8", q, scale, block=scheme.block, activations="group")
    if scale.numel() == 1:  # per tensor: the same scale on every row, exactly
        scale = scale.reshape(1).expand(rows).contiguous()
    elif scale.numel() != rows:
        raise ValueError(f"weight_scale has {scale.numel()} values, expected 1 or {rows}")
    return QuantizedWeight(
        "fp8", q, scale.reshape(rows), activations=scheme.activations, input_scale=input_scale
    )


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit values (int8, ``[rows, cols]``) packed along the columns into int32 words, the
    first value in the lowest bits, offset by ``2**(bits-1)`` to unsigned: compressed-tensors' layout."""
    per_word = 32 // bits
    rows, cols = values.shape
    unsigned = values.to(torch.int32) + (1 << (bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, -cols % per_word)).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=values.device) * bits
    shifted = unsigned << shifts
    word = shifted[..., 0]
    for i in range(1, per_word):
        word = word | shifted[..., i]
    return word.contiguous()


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_int32``: ``[rows, cols]`` int8."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed weights have dtype {words.dtype}, expected int32")
    if sys.byteorder == "little" and bits in (4, 8):
        # Whole bytes hold whole values, the first value in the lowest byte: read the words as bytes
        # (a shift per value over int32 words takes ~10x as long on a 1B model).
        raw = words.contiguous().view(torch.uint8)
        if bits == 8:  # a byte is value + 128: flipping its top bit gives the value's two's complement
            return (raw[:, :cols] ^ 0x80).view(torch.int8).contiguous()
        nibbles = torch.stack([raw & 0xF, raw >> 4], dim=-1).reshape(words.shape[0], -1)[:, :cols]
        return (nibbles.view(torch.int8) - 8).contiguous()
    return unpack_int32_by_shifts(words, bits, cols)


def unpack_int32_by_shifts(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """``unpack_int32`` for any byte order and bit width: one shift and mask per value."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
    values = (words[..., None] >> shifts) & ((1 << bits) - 1)
    values = values.reshape(words.shape[0], -1)[:, :cols] - (1 << (bits - 1))
    return values.to(torch.int8)
