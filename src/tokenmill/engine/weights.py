"""Reading checkpoint tensors from a Hugging Face folder (single or sharded safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tokenmill.engine.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint, from its index when sharded."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} names shards that are missing: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"model folder {str(folder)!r} has no *.safetensors weights "
            "(only safetensors checkpoints are read; convert .bin files first)"
        )
    return files


def iter_checkpoint(
    folder: Path, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor, cast to ``dtype`` on ``device``."""
    for file in safetensors_files(folder):
        # Reading straight onto the device skips a host copy of every tensor.
        for name, tensor in read_tensors(file, str(device)):
            yield name, tensor.to(device=device, dtype=dtype)


def read_tensors(file: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of one safetensors file, as stored. A file that cannot be read (cut short,
    not safetensors) raises ModelLoadError naming it; the caller's own errors pass through untouched."""
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise unreadable(file, e) from e


def tensor_shapes(file: Path) -> dict[str, list[int]]:
    """Every tensor's shape, from the file's header alone (no data is read)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as e:
        raise unreadable(file, e) from e


def unreadable(file: Path, e: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot read {file}: {e} (is the file complete?)")
