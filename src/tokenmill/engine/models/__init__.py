"""Model implementations, looked up by the ``architectures`` entry of config.json."""

from __future__ import annotations

from torch import nn

from tokenmill.engine.config import ModelConfig
from tokenmill.engine.errors import UnsupportedArchitectureError
from tokenmill.engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {cfg.architecture!r} is not supported: supported are "
            + ", ".join(sorted(MODEL_REGISTRY))
        ) from None


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "model_class"]
