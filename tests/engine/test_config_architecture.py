"""An architecture no model implements is refused by name before config.json's fields are read: a
GPT-2 config has no 'hidden_size', and saying so would hide that GPT-2 itself is what is refused."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from tokenmill.cli.main import app
from tokenmill.engine import ModelConfig, UnsupportedArchitectureError
from tokenmill.engine.models import MODEL_REGISTRY

REFUSAL = "architecture 'GPT2LMHeadModel' is not supported: supported are " + ", ".join(
    sorted(MODEL_REGISTRY)
)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tokenizer_dir):
    """config.json as transformers writes GPT-2's (n_embd, n_layer, n_head), with a tokenizer beside it."""
    import transformers

    folder = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4)
    config.architectures = ["GPT2LMHeadModel"]  # what saving a GPT2LMHeadModel writes
    config.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def test_the_architecture_is_checked_before_the_fields(gpt2_folder):
    raw = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_layer": 2}
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_dict(raw)
    assert str(e.value) == REFUSAL
    with pytest.raises(UnsupportedArchitectureError) as e:
        ModelConfig.from_pretrained(gpt2_folder)
    assert str(e.value) == REFUSAL


def test_an_engine_refuses_it_by_name(gpt2_folder, make_engine):
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        make_engine(gpt2_folder)


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "{model}", "--out", "{tmp}/out"],
        ["serve", "{model}", "--port", "0", "--grpc-port", "-1", "--device", "cpu"],
        ["profile", "--model", "{model}", "-o", "{tmp}/p.json", "--device", "cpu"],
        ["generate", "--model", "{model}", "--device", "cpu", "hi"],
    ],
    ids=lambda c: c[0],
)
def test_every_command_names_the_architecture(gpt2_folder, tmp_path, command):
    args = [a.format(model=gpt2_folder, tmp=tmp_path) for a in command]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    output = " ".join(result.output.split())
    assert result.exit_code == 2, output
    assert REFUSAL in output and "hidden_size" not in output
    assert not (tmp_path / "out").exists()
