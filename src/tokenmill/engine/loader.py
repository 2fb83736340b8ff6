"""Load and prepare weights: one step from a checkpoint folder to a ready model.

The model is built with uninitialised parameters of the right dtype on the
target device (no random init), then filled from the checkpoint. What comes
out is the prepared state (fused, cast) that a snapshot will later save and
restore in place of this step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmill.engine.config import ModelConfig
from tokenmill.engine.models import model_class
from tokenmill.engine.models.cpu_packing import pack_linear_layers, packing_supported
from tokenmill.engine.models.layers import rope_inv_freq
from tokenmill.engine.quantized_checkpoint import iter_quantized_checkpoint, read_checkpoint_quantization
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.engine.weights import iter_checkpoint

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` is the demo model shipped in the package."""
    return DEMO_MODEL_DIR if model is None else Path(model).expanduser()


def check_model_folder(folder: Path) -> ModelConfig:
    """The checks loading makes before it reads a weight: config.json (the architecture first), the
    tokenizer, the rope scaling. Raises ModelLoadError with loading's own messages. ``tokenmill
    quantize`` runs them before its work, so it never writes a folder that serve then refuses."""
    config = ModelConfig.from_pretrained(folder)
    Tokenizer(folder)
    rope_inv_freq(config.head_dim, config.rope)
    return config


def load_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    assert cfg.path is not None
    start = time.perf_counter()
    # Parameters are created empty, right on the device and in the dtype (the
    # meta-device route costs more: to_empty pulls in torch's symbolic machinery).
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = model_class(cfg)(cfg)
    finally:
        torch.set_default_dtype(previous)
    scheme = read_checkpoint_quantization(cfg.path)
    if scheme is None:
        model.load_weights(iter_checkpoint(cfg.path, dtype, device))
    else:
        model.load_weights(iter_quantized_checkpoint(cfg.path, dtype, device, scheme))
        logger.info("read %s weights (%s) without re-quantizing", scheme.method, scheme.source)
    model.checkpoint_quantization = scheme  # quantize_model checks it against --quantization
    model.rotary.build(device, dtype)
    model.eval().requires_grad_(False)
    logger.info("loaded %s in %.2f s", cfg.path, time.perf_counter() - start)
    return model


def pack_for_device(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """The last preparation step: device-specific weight layouts (oneDNN packing for
    bf16 on CPU). Returns the number of layers packed."""
    if not packing_supported(dtype, device):
        return 0
    start = time.perf_counter()
    packed = pack_linear_layers(model)
    logger.info("packed %d linear layers for oneDNN in %.2f s", packed, time.perf_counter() - start)
    return packed


def weight_bytes(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Parameters and buffers (int8 weights and their scales are buffers), and what packing for
    the device will add beside them (``pack_for_device``; call this before it)."""
    tensors = [*model.parameters(), *model.buffers()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if packing_supported(dtype, device):
        total += sum(m.pack_copy_bytes() for m in model.modules() if hasattr(m, "pack_copy_bytes"))
    return total


def generation_defaults(folder: Path) -> dict[str, Any]:
    """generation_config.json, or {} when absent or unreadable (it is optional)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s", path)
        return {}
