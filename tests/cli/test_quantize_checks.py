"""`tokenmill quantize` refuses, before any work and in one line with exit 2, what loading would refuse
afterwards: it never prints "serve it with" for a folder that serve cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmill.cli.main import app
from tokenmill.engine import ModelLoadError


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    return result.exit_code, " ".join(result.output.split())


def _copy(src: Path, folder: Path, **config_changes) -> Path:
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _load_error(make_engine, folder: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        make_engine(folder)
    return str(e.value)


@pytest.mark.parametrize("broken", ["architecture", "tokenizer", "rope"])
def test_what_loading_refuses_is_refused_before_any_work(tiny_llama, tmp_path, make_engine, broken):
    if broken == "architecture":
        folder = _copy(tiny_llama, tmp_path / "foo", architectures=["FooForCausalLM"], model_type="foo")
        expected = "architecture 'FooForCausalLM' is not supported: supported are LlamaForCausalLM"
    elif broken == "tokenizer":
        folder = _copy(tiny_llama, tmp_path / "notok")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
        expected = f"model folder '{folder}' has no tokenizer.json"
    else:
        folder = _copy(tiny_llama, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0})
        expected = "rope_type='yarn' is not supported"
    message = _load_error(make_engine, folder)  # what serve and generate say
    assert expected in message
    code, output = _run("quantize", str(folder), "--out", str(tmp_path / "out"))
    assert code == 2, output
    assert output == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", ["header", "data"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_cut_short_weights_file_is_named_in_one_line(tiny_llama, tmp_path, make_engine, cut, method):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:1000] if cut == "header" else data[:-100])
    message = _load_error(make_engine, folder)  # what serve and generate say
    assert message.startswith(f"cannot read {weights}: ") and message.endswith("(is the file complete?)")
    code, output = _run("quantize", str(folder), "--method", method, "--out", str(tmp_path / "new" / "out"))
    assert code == 2, output
    assert output == f"error: {message}"
    assert not (tmp_path / "new").exists()


def test_int4_with_no_layer_it_fits_is_refused(tokenizer_dir, tmp_path):
    from tests.tiny_models import build_tiny_model

    # 80 and 200 inputs: no int4 group (32, 64, 128) divides either, so every layer would stay plain.
    folder = build_tiny_model(tmp_path / "h80", "llama", tokenizer_dir, hidden_size=80, intermediate_size=200)
    code, output = _run("quantize", str(folder), "--method", "int4", "--out", str(tmp_path / "out"))
    assert code == 2, output
    assert output == (
        f"error: method int4 would leave {folder} plain: no linear layer's input size is divisible by "
        "32, 64 or 128 (int4's group sizes); use int8 or fp8"
    )
    assert not (tmp_path / "out").exists()
    assert _run("quantize", str(folder), "--method", "int8", "--out", str(tmp_path / "int8"))[0] == 0
