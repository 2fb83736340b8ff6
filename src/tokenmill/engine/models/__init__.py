"""Model implementations, looked up by the ``architectures`` entry of config.json."""

from __future__ import annotations

from torch import nn

from tokenmill.engine.config import ModelConfig, check_architecture
from tokenmill.engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    check_architecture(cfg.architecture)  # (one message for every path that refuses it)
    return MODEL_REGISTRY[cfg.architecture]


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "model_class"]
