"""The Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3.

They differ only in details that ModelConfig names: q/k/v biases (Qwen2), a
per-head RMSNorm on q and k (Qwen3), sliding-window attention (Mistral v0.1),
tied embeddings. Inputs are flat: all tokens of all requests of a step in one
``[T]`` tensor, with attention told by an ``AttentionContext`` which token
belongs to which sequence and where its KV lives.

q/k/v and gate/up are fused into one matmul each; ``load_weights`` maps the
checkpoint's separate tensors onto the fused ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.engine.attention.backend import AttentionContext
from tokenmill.engine.config import ModelConfig
from tokenmill.engine.errors import ModelLoadError
from tokenmill.engine.models.cpu_packing import pack_weight, packed_linear
from tokenmill.engine.models.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    linear,
)
from tokenmill.engine.quantization import QuantizedWeight

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) rows of the step's positions

# checkpoint name fragment -> (our fused parameter, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, rope: Rope, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(qkv[:, : self.q_size].view(t, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(t, self.num_kv_heads, -1))
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        else:
            # q and k side by side are one [T, heads + kv_heads, D] tensor: rotated in one go.
            qk = qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads, -1)
            q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        out = ctx.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, rope: Rope, hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden = hidden + self.self_attn(rope, self.input_layernorm(hidden), ctx)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied checkpoints have no lm_head tensor: logits reuse the embedding.
        self.lm_head = (
            None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.packed_logits: torch.Tensor | None = None  # a tied embedding in oneDNN's layout (pack())

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Hidden states after the final norm, one row per input token."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)
        for layer in self.layers:
            hidden = layer(rope, hidden, ctx)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.packed_logits is not None:
            return packed_linear(hidden, self.packed_logits, None)
        return linear(hidden, self.embed_tokens.weight)

    def logits_layer(self) -> Linear:
        """The logits' layer, for quantizing it: a tied model gets its own Linear over the embedding's
        storage (no copy; quantizing it swaps that for the kernel's form, and the lookup keeps the
        embedding)."""
        if self.lm_head is None:
            head = Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
            head.weight.data = self.embed_tokens.weight.data
            self.lm_head = head
        return self.lm_head

    def pack(self) -> bool:
        """A tied model's logits through a oneDNN-packed copy of the embedding (the lookup needs the
        plain one, so both stay): the logits are the widest matmul of a decode step, and unpacked
        they ran at a quarter of the packed layers' speed (1B, 32k vocabulary: 9.5 ms of a step)."""
        if self.lm_head is not None:
            return False  # an untied head is a Linear, packed as one
        self.packed_logits = pack_weight(self.embed_tokens.weight.data)
        return self.packed_logits is not None

    def pack_copy_bytes(self) -> int:
        """Memory ``pack()`` adds beside the weights, for the capacity plan."""
        w = self.embed_tokens.weight
        return 0 if self.lm_head is not None else w.numel() * w.element_size()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters; a pre-quantized
        layer's weight comes as a QuantizedWeight and its linear layer builds its kernel from it.

        Raises ModelLoadError naming any tensor that is missing, has no place in
        the model, or has the wrong shape.
        """
        params = dict(self.named_parameters())
        shard_sizes = self._shard_sizes()
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # derived buffers; a tied checkpoint may still carry a head copy
            target, offset, size = name, 0, None
            for frag, (fused, idx) in _FUSED.items():
                if f".{frag}." in name:
                    target = name.replace(frag, fused)
                    offset, size = sum(shard_sizes[fused][:idx]), shard_sizes[fused][idx]
                    break
            param = params.get(target)
            if param is None:
                raise ModelLoadError(
                    f"checkpoint tensor {hf_name!r} has no place in {self.config.architecture}"
                )
            if isinstance(tensor, QuantizedWeight):
                self._stage_quantized(hf_name, target, tensor, offset, size or param.shape[0])
                loaded.add(name)
                continue
            dest = param.data if size is None else param.data.narrow(0, offset, size)
            if dest.shape != tensor.shape:
                raise ModelLoadError(
                    f"checkpoint tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded.add(name)
        missing = sorted(self._checkpoint_names(params) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors: {shown}")
        for module in self.modules():
            if isinstance(module, Linear):
                module.finish_loading()

    def _stage_quantized(
        self, hf_name: str, target: str, qw: QuantizedWeight, offset: int, size: int
    ) -> None:
        module = self.get_submodule(target.removesuffix(".weight"))
        if not isinstance(module, Linear):
            raise ModelLoadError(
                f"checkpoint tensor {hf_name!r} is quantized, but its layer takes plain weights"
            )
        if qw.shape[0] != size:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} has {qw.shape[0]} rows, expected {size}")
        try:
            module.stage_rows(qw, offset)
        except ValueError as e:
            raise ModelLoadError(f"checkpoint tensor {hf_name!r} {e}") from e

    def _shard_sizes(self) -> dict[str, list[int]]:
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}

    @staticmethod
    def _checkpoint_names(params: dict[str, nn.Parameter]) -> set[str]:
        """The checkpoint tensor names (without ``model.``) that fill our parameters."""
        names = set()
        for name in params:
            parts = [name.replace(fused, frag) for frag, (fused, _) in _FUSED.items() if f".{fused}." in name]
            names.update(parts or [name])
        return names
