"""ModelConfig reads both transformers spellings; EngineConfig validates; KV plan arithmetic."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.tiny_models import ARCHITECTURES
from tokenmill.engine import (
    EngineConfig,
    InvalidRequestError,
    ModelConfig,
    ModelLoadError,
    UnsupportedArchitectureError,
)
from tokenmill.engine.config import RopeConfig
from tokenmill.engine.memory import plan_kv_cache
from tokenmill.engine.models import MODEL_REGISTRY

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
}
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
# Llama 3.1 8B as transformers 4.x wrote it ...
V4 = {**BASE, "torch_dtype": "bfloat16", "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE}
# ... and as transformers 5.x writes it.
V5 = {**BASE, "dtype": "bfloat16", "rope_parameters": {**LLAMA31_ROPE, "rope_theta": 500000.0}}


@pytest.mark.parametrize("raw", [V4, V5], ids=["transformers4", "transformers5"])
def test_both_spellings_parse_to_the_same_config(raw):
    cfg = ModelConfig.from_dict(raw)
    assert cfg.dtype == torch.bfloat16
    assert cfg.rope == RopeConfig(
        theta=500000.0,
        scaling_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert cfg.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, bf16
    assert ModelConfig.from_dict(V4) == ModelConfig.from_dict(V5)


def test_older_spellings():
    """``type`` instead of ``rope_type`` (transformers < 4.43), no dtype at all, a single eos id."""
    raw = {**BASE, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": 2}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.scaling_type == "linear" and cfg.rope.factor == 2.0 and cfg.rope.theta == 1e6
    assert cfg.dtype == torch.float32 and cfg.eos_token_ids == (2,)
    cfg = ModelConfig.from_dict({**BASE, "torch_dtype": "torch.float16", "rope_scaling": None})
    assert cfg.dtype == torch.float16 and cfg.rope == RopeConfig()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_configs_written_by_transformers_parse(arch, tiny_models):
    import transformers

    cfg = ModelConfig.from_pretrained(tiny_models[arch])
    hf = transformers.AutoConfig.from_pretrained(tiny_models[arch])
    assert cfg.architecture == hf.architectures[0] and cfg.model_type == hf.model_type
    assert cfg.num_kv_heads == hf.num_key_value_heads and cfg.num_layers == hf.num_hidden_layers
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch == "qwen3")
    assert cfg.sliding_window is None
    assert cfg.rope.theta == hf.rope_parameters["rope_theta"] and cfg.dtype == torch.float32
    assert cfg.path == tiny_models[arch]


def test_qwen2_sliding_window_only_when_enabled():
    raw = {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 4096}
    assert ModelConfig.from_dict(raw).sliding_window is None
    assert ModelConfig.from_dict({**raw, "use_sliding_window": True}).sliding_window == 4096
    mistral = {**BASE, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    assert ModelConfig.from_dict({**mistral, "sliding_window": 4096}).sliding_window == 4096


def write_model(tmp_path, src, **changes):
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, tiny_llama, make_engine):
    folder = write_model(tmp_path, tiny_llama, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedArchitectureError) as e:
        make_engine(folder, kv_cache_memory=1 << 22)
    assert isinstance(e.value, ModelLoadError)
    message = str(e.value)
    assert "GPT2LMHeadModel" in message
    for name in MODEL_REGISTRY:
        assert name in message
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"} <= set(
        MODEL_REGISTRY
    )


def test_unsupported_rope_type_is_a_load_error(tmp_path, tiny_llama, make_engine):
    folder = write_model(tmp_path, tiny_llama, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match=r"yarn.*supported are default, linear, llama3"):
        make_engine(folder, kv_cache_memory=1 << 22)


def test_missing_field_and_bad_json_are_load_errors(tmp_path):
    raw = dict(BASE)
    del raw["hidden_size"]
    with pytest.raises(ModelLoadError, match="hidden_size"):
        ModelConfig.from_dict(raw)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_seqs", 0),
        ("block_size", 12),
        ("max_model_len", 1),
        ("max_num_batched_tokens", 0),
        ("kv_cache_memory", 1.5),
        ("kv_cache_memory", 0.0),
        ("kv_cache_memory", -5),
        ("seed", "x"),  # was torch's "manual_seed expected a long", after loading the model
        ("seed", 2**64),
        ("seed", True),
    ],
)
def test_engine_config_validation_names_the_field(field, value):
    with pytest.raises(InvalidRequestError) as e:
        EngineConfig(**{field: value}).validate()
    assert e.value.field == field and field in str(e.value)


def test_engine_config_defaults_are_valid():
    EngineConfig().validate()


@pytest.mark.parametrize(
    ("field", "value"), [("dtype", "float8"), ("device", "tpu:0"), ("attention_backend", "x")]
)
def test_bad_engine_choices_name_the_field(field, value, tiny_llama, make_engine):
    with pytest.raises(InvalidRequestError) as e:
        make_engine(tiny_llama, kv_cache_memory=1 << 22, **{field: value})
    assert e.value.field == field


def test_max_model_len_cannot_exceed_the_model(tiny_llama, make_engine):
    with pytest.raises(InvalidRequestError, match="max_position_embeddings") as e:
        make_engine(tiny_llama, kv_cache_memory=1 << 22, max_model_len=4096)
    assert e.value.field == "max_model_len"


def test_kv_plan_arithmetic():
    """Llama 3.1 8B in bf16: 128 KiB of K and V per token, 2 MiB per 16-token block. 1 GiB = 512 blocks
    (511 usable = 8176 tokens); max_model_len 2048 needs 128 blocks: 3 full sequences at once."""
    cfg = ModelConfig.from_dict(V5)
    plan = plan_kv_cache(cfg, torch.bfloat16, torch.device("cpu"), 16, 2048, 1 << 30, weight_bytes=0)
    assert plan.bytes_per_block == 2 * 1024 * 1024
    assert (plan.num_blocks, plan.num_usable_blocks, plan.num_tokens) == (512, 511, 8176)
    assert (plan.blocks_per_sequence, plan.max_full_length_sequences) == (128, 3)
    assert "511 blocks" in plan.summary() and "3 sequences" in plan.summary()
