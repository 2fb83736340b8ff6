"""Pre-quantized checkpoints: what `tokenmill quantize` writes loads without re-quantizing and runs exactly
like quantizing at load; compressed-tensors (the library vLLM reads with) agrees with our layout both ways;
block-wise fp8 in DeepSeek's layout loads; bad checkpoints are refused with the field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

# compressed-tensors is a test dependency (pyproject.toml): a missing one must fail, not skip.
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tokenmill.engine.errors import InvalidRequestError, ModelLoadError
from tokenmill.engine.fp8 import quantize_fp8_blocks
from tokenmill.engine.models.quantized import Fp8Weights, Int4Weights, Int8Weights
from tokenmill.engine.quantization import (
    QuantizedWeight,
    dequantize_weight,
    quantize_weight,
)
from tokenmill.engine.quantized_checkpoint import (
    decode,
    pack_int32,
    parse_quantization_config,
    read_checkpoint_quantization,
    unpack_int32,
    unpack_int32_by_shifts,
)
from tokenmill.engine.quantized_checkpoint_writer import encode, save_quantized
from tokenmill.engine.scoring import prompt_logits

PROMPTS = [[5, 17, 99, 203, 41, 7, 300], [44, 45, 46, 47, 48]]
KERNELS = {"int8": Int8Weights, "int4": Int4Weights, "fp8": Fp8Weights}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([4, 8]), st.integers(1, 9), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_int_packing_is_compressed_tensors_layout(bits, rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1))
    values = torch.randint(low, high, (rows, cols), generator=gen, dtype=torch.int8)
    ours = pack_int32(values, bits)
    assert torch.equal(ours, pack_to_int32(values, bits))
    assert torch.equal(unpack_int32(ours, bits, cols), values)
    assert torch.equal(unpack_int32_by_shifts(ours, bits, cols), values)  # the big-endian route
    # Zero points are packed along the rows: the same helpers on the transpose.
    by_rows = pack_int32(values.t(), bits).t()
    assert torch.equal(by_rows, pack_to_int32(values, bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(by_rows, bits, values.shape, packed_dim=0), values)


def _ct_decompress(config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' own reading of one layer's tensors, from the config we wrote."""
    parsed = QuantizationConfig.model_validate(config)
    group = parsed.config_groups["group_0"]
    scheme = QuantizationScheme(
        targets=group.targets, weights=group.weights, input_activations=group.input_activations
    )
    compressor = BaseCompressor.get_value_from_registry(parsed.format)
    return compressor.decompress(dict(tensors), scheme)["weight"].float()


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_saved_layers_decompress_with_compressed_tensors_to_our_weights(tmp_path, tiny_llama, method):
    out = save_quantized(tiny_llama, tmp_path / method, method, torch.float32).out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    saved = load_file(str(out / "model.safetensors"))
    source = load_file(str(tiny_llama / "model.safetensors"))
    module = "model.layers.1.mlp.down_proj"
    tensors = {k.removeprefix(module + "."): v for k, v in saved.items() if k.startswith(module + ".")}
    group = config["config_groups"]["group_0"]["weights"].get("group_size")
    assert group == (64 if method == "int4" else None)  # the model's one group: 64 fits every layer
    qw = quantize_weight(source[f"{module}.weight"], method, group)
    ours = dequantize_weight(qw, torch.float32)
    assert torch.allclose(_ct_decompress(config, tensors), ours, rtol=1e-6, atol=1e-7)
    assert torch.equal(
        dequantize_weight(decode(tensors, parse_quantization_config(config)), torch.float32), ours
    )
    assert (
        "lm_head.weight" in saved and saved["lm_head.weight"].dtype == torch.float32
    )  # the head stays plain


def _greedy(engine, n=10):
    from tokenmill.engine import SamplingParams

    params = SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_a_saved_model_runs_exactly_like_quantizing_at_load(tmp_path, tiny_models, make_engine, method):
    for arch in ("llama", "qwen3"):
        out = save_quantized(tiny_models[arch], tmp_path / arch, method, torch.float32).out
        assert read_checkpoint_quantization(out).method == method
        at_load = make_engine(tiny_models[arch], quantization=method, dtype="float32")
        saved = make_engine(out, dtype="float32")
        kernels = [m for m in saved.model.modules() if isinstance(m, KERNELS[method])]
        # qkv, o, gate_up, down in each of 2 layers. The file keeps the head plain (as vLLM reads
        # compressed-tensors); int8 quantizes it at load, as it does for --quantization int8.
        assert len(kernels) == 2 * 4 + (method == "int8"), arch
        assert torch.equal(prompt_logits(saved, PROMPTS)[0], prompt_logits(at_load, PROMPTS)[0]), arch
        assert _greedy(saved) == _greedy(at_load), arch
        assert saved.kv_plan.weight_bytes == at_load.kv_plan.weight_bytes
        # Asking again for the same method is a no-op; another one is refused with both named.
        make_engine(out, quantization=method, dtype="float32")
        other = "int8" if method != "int8" else "fp8"
        with pytest.raises(
            InvalidRequestError, match=f"quantization='{other}' is invalid: allowed {method} or none"
        ):
            make_engine(out, quantization=other, dtype="float32")


def test_a_model_written_in_several_shards_loads_the_same(tmp_path, tiny_llama, make_engine, monkeypatch):
    from tokenmill.engine import quantized_checkpoint_writer

    monkeypatch.setattr(quantized_checkpoint_writer, "SHARD_BYTES", 40_000)
    out = save_quantized(tiny_llama, tmp_path / "sharded", "int8", torch.float32).out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not list(out.glob(".shard-*"))
    whole = save_quantized(tiny_llama, tmp_path / "whole", "int8", torch.float32).out
    got = prompt_logits(make_engine(out, dtype="float32"), PROMPTS)[0]
    assert torch.equal(got, prompt_logits(make_engine(whole, dtype="float32"), PROMPTS)[0])


def _rewrite(src: Path, out: Path, quantization_config: dict, layer) -> Path:
    """A copy of ``src`` whose linear layers (all but the head) are replaced by ``layer(name, weight)``'s
    tensors, with ``quantization_config`` in its config."""
    shutil.copytree(src, out)
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if ".layers." in name and name.endswith("_proj.weight"):
            module = name.removesuffix(".weight")
            tensors.update({f"{module}.{k}": v for k, v in layer(name, t).items()})
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return out


def _dense_with(src: Path, out: Path, weights: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    tensors.update(weights)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_compressed_tensors_fp8_per_tensor_with_static_activations_loads(tmp_path, tiny_llama, make_engine):
    """The "FP8" scheme (static): weights per tensor, one calibrated input scale per layer, made by
    compressed-tensors' own compressor."""
    weights_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True)
    acts_args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights_args, input_activations=acts_args)
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    dequantized = {}

    def layer(name, w):
        scale = (w.abs().max() / 448).reshape(1)
        state = compressor.compress({"weight": w, "weight_scale": scale}, scheme)
        dequantized[name] = compressor.decompress(dict(state), scheme)["weight"].float()
        return {**state, "input_scale": torch.tensor([0.02])}

    config = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {"targets": ["Linear"], **scheme.model_dump(include={"weights", "input_activations"})}
        },
        "ignore": ["lm_head"],
    }
    config = json.loads(json.dumps(config, default=str))
    folder = _rewrite(tiny_llama, tmp_path / "fp8-static", config, layer)
    engine = make_engine(folder, dtype="float32")
    kernels = [m for m in engine.model.modules() if isinstance(m, Fp8Weights)]
    assert kernels and all(k.input_scale is not None and k.activations == "tensor" for k in kernels)
    reference = make_engine(_dense_with(tiny_llama, tmp_path / "dense", dequantized), dtype="float32")
    got, want = prompt_logits(engine, PROMPTS)[0], prompt_logits(reference, PROMPTS)[0]
    # Only the activations' fp8 rounding differs: ~0.10 through this random model, the same with any scale
    # that does not clip (0.02 or 0.04); 0.01 clips some (0.19), 0.005 more (0.45).
    assert _relative_error(got, want) < 0.15
    # The static scale is used: a wildly wrong one clips every activation and wrecks the logits.
    broken = _rewrite(
        tiny_llama,
        tmp_path / "fp8-clipped",
        config,
        lambda n, w: {**layer(n, w), "input_scale": torch.tensor([1e-5])},
    )
    assert _relative_error(prompt_logits(make_engine(broken, dtype="float32"), PROMPTS)[0], want) > 0.3


def test_block_fp8_in_deepseek_layout_loads_without_requantizing(tmp_path, tiny_llama, make_engine):
    block = (32, 32)
    dequantized = {}

    def layer(name, w):
        q, scales = quantize_fp8_blocks(w, block)
        dequantized[name] = dequantize_weight(QuantizedWeight("fp8", q, scales, block=block), torch.float32)
        return {"weight": q, "weight_scale_inv": scales}

    config = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block),
    }
    folder = _rewrite(tiny_llama, tmp_path / "block", config, layer)
    engine = make_engine(folder, dtype="float32")
    kernels = [m for m in engine.model.modules() if isinstance(m, Fp8Weights)]
    assert len(kernels) == 8 and all(k.block == block and k.scales.shape[0] > 1 for k in kernels)
    qkv = engine.model.layers[0].self_attn.qkv_proj.quantized
    assert qkv.qweight.dtype == torch.float8_e4m3fn and tuple(qkv.scales.shape) == (128 // 32, 64 // 32)
    reference = make_engine(_dense_with(tiny_llama, tmp_path / "dense", dequantized), dtype="float32")
    got, want = prompt_logits(engine, PROMPTS)[0], prompt_logits(reference, PROMPTS)[0]
    assert _relative_error(got, want) < 0.1
    # Blocks that straddle q, k and v cannot be fused: refused, naming the tensor.
    config["weight_block_size"] = [48, 32]
    straddling = _rewrite(tiny_llama, tmp_path / "straddle", config, lambda n, w: _block_layer(w, (48, 32)))
    with pytest.raises(ModelLoadError, match=r"_proj.weight' rows 0:\d+ do not fall on 48-row block edges"):
        make_engine(straddling, dtype="float32")


def _block_layer(w, block):
    q, scales = quantize_fp8_blocks(w, block)
    return {"weight": q, "weight_scale_inv": scales}


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"quant_method": "awq"}, r"quant_method='awq' is not supported: supported are 'compressed-tensors'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size=\[128\] is not supported"),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
            "activation_scheme='static' is not supported",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "group_0": {"weights": {"num_bits": 4, "type": "int", "strategy": "channel"}},
                },
            },
            r"group_0.weights: int4 with strategy='channel'.*supported is strategy 'group'",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "float-quantized",
                "config_groups": {
                    "a": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
                    "b": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}},
                },
            },
            "2 different schemes: supported is one scheme",
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "marlin-24",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}},
            },
            "format='marlin-24' is not supported",
        ),
    ],
)
def test_unsupported_quantization_configs_name_the_field(config, match):
    with pytest.raises(ModelLoadError, match=match):
        parse_quantization_config(config)


def test_a_layer_missing_its_scale_is_named(tmp_path, tiny_llama, make_engine):
    out = save_quantized(tiny_llama, tmp_path / "int8", "int8", torch.float32).out
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model.layers.0.mlp.up_proj' lacks weight_scale"):
        make_engine(out, dtype="float32")


def test_quantizing_a_quantized_checkpoint_is_refused(tmp_path, tiny_llama):
    out = save_quantized(tiny_llama, tmp_path / "int8", "int8", torch.float32).out
    with pytest.raises(ModelLoadError, match="already quantized"):
        save_quantized(out, tmp_path / "again", "int4", torch.float32)
    with pytest.raises(ValueError, match="method='int3' is invalid: allowed int8, int4, fp8"):
        save_quantized(tiny_llama, tmp_path / "bad", "int3", torch.float32)


def test_encode_then_decode_is_exact_for_every_method():
    torch.manual_seed(3)
    w = torch.randn(48, 64)
    for method, group in (("int8", None), ("int4", 32), ("fp8", None)):
        qw = quantize_weight(w, method, group)
        scheme_config = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized" if method == "fp8" else "pack-quantized",
            "config_groups": {"g": json.loads(json.dumps(_config_group(method, group)))},
        }
        back = decode(encode(qw), parse_quantization_config(scheme_config))
        assert torch.equal(dequantize_weight(back, torch.float32), dequantize_weight(qw, torch.float32)), (
            method
        )


def _config_group(method, group):
    from tokenmill.engine.quantized_checkpoint_writer import compressed_tensors_config

    return compressed_tensors_config(method, group, [])["config_groups"]["group_0"]


@pytest.mark.parametrize(
    ("fmt", "weights"),
    [
        (
            "float-quantized",
            {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [32, 32]},
        ),
        ("naive-quantized", {"num_bits": 8, "type": "int", "strategy": "channel"}),
        ("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}),
        ("naive-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}),
    ],
)
def test_layers_compressed_by_compressed_tensors_decode_to_its_own_weights(fmt, weights):
    """Scales computed by compressed-tensors' own observer, compressed by its own compressor."""
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(5)
    w = torch.randn(64, 96) * 0.1
    args = QuantizationArgs(symmetric=True, **weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    if args.strategy == "block":
        tiles = w.reshape(2, 32, 3, 32)
        low, high = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    elif args.strategy == "group":
        low, high = w.reshape(64, 3, 32).amin(-1), w.reshape(64, 3, 32).amax(-1)
    else:
        low, high = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, _ = calculate_qparams(low, high, args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state = compressor.compress({"weight": w, "weight_scale": scale}, scheme)
    theirs = compressor.decompress(dict(state), scheme)["weight"].float()
    config = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"g": {"weights": json.loads(args.model_dump_json()), "input_activations": None}},
    }
    ours = dequantize_weight(decode(state, parse_quantization_config(config)), torch.float32)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert (ours - w).abs().max() < 0.2 * w.abs().max()  # and both are the weight, roughly
