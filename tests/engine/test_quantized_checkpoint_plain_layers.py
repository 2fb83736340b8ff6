"""A saved int4 model with some layers left plain (no int4 group divides their inputs) loads and
computes exactly what ``quantization="int4"`` at load computes on the original."""

from __future__ import annotations

import json

import torch

from tests.tiny_models import build_tiny_model, random_prompts
from tokenmill.engine.models.quantized import Int4Weights
from tokenmill.engine.quantized_checkpoint_writer import save_quantized
from tokenmill.engine.scoring import prompt_logits

PROMPTS = random_prompts([5, 9, 3], seed=4)


def test_a_model_with_some_plain_int4_layers_loads_as_at_load(tokenizer_dir, tmp_path, make_engine):
    # 64 inputs take groups of 64; down_proj's 80 take none, so it stays plain in each of the 2 layers.
    original = build_tiny_model(tmp_path / "i80", "llama", tokenizer_dir, intermediate_size=80)
    report = save_quantized(original, tmp_path / "int4", "int4", torch.float32)
    assert report.quantized_layers == 12
    assert report.plain_layers == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    config = json.loads((report.out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert config["ignore"] == ["lm_head", *report.plain_layers]
    saved = make_engine(report.out, dtype="float32")
    at_load = make_engine(original, quantization="int4", dtype="float32")
    kernels = [m for m in saved.model.modules() if isinstance(m, Int4Weights)]
    assert len(kernels) == len([m for m in at_load.model.modules() if isinstance(m, Int4Weights)]) == 2 * 3
    assert torch.equal(prompt_logits(saved, PROMPTS)[0], prompt_logits(at_load, PROMPTS)[0])
