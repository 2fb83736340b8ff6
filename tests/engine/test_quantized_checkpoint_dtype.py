"""A model quantized from bfloat16 says so in its config.json and stores its plain tensors in it, so
the folder served as it is computes what ``--quantization METHOD --dtype bfloat16`` computes on the
original, without a --dtype to remember."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import random_prompts
from tokenmill.engine.quantized_checkpoint_writer import save_quantized
from tokenmill.engine.scoring import prompt_logits

PROMPTS = random_prompts([6, 3, 8], seed=7)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_a_model_quantized_from_bfloat16_serves_in_bfloat16(tmp_path, tiny_llama, make_engine, method):
    assert json.loads((tiny_llama / "config.json").read_text())["dtype"] == "float32"
    out = save_quantized(tiny_llama, tmp_path / method, method, torch.bfloat16).out
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config  # the spelling it had
    tensors = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert tensors[name].dtype == torch.bfloat16, name
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    saved = make_engine(out)  # no dtype: the checkpoint's
    at_load = make_engine(tiny_llama, quantization=method, dtype="bfloat16")
    assert saved.dtype == at_load.dtype == torch.bfloat16
    assert torch.equal(prompt_logits(saved, PROMPTS)[0], prompt_logits(at_load, PROMPTS)[0])


def test_a_config_in_transformers_4_spelling_keeps_it(tmp_path, tiny_llama):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for item in tiny_llama.iterdir():
        (legacy / item.name).write_bytes(item.read_bytes())
    config = json.loads((legacy / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")
    (legacy / "config.json").write_text(json.dumps(config))
    out = save_quantized(legacy, tmp_path / "int8", "int8", torch.float16).out
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "float16" and "dtype" not in written
