"""`tokenmill quantize`: writes a checkpoint that `tokenmill generate` runs as it is; bad options exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tokenmill.cli.main import app


class _Result:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = " ".join(result.output.replace("│", " ").split())  # rich wraps and boxes long lines


def _run(*args: str) -> _Result:
    return _Result(CliRunner().invoke(app, list(args)))


def test_quantize_writes_a_checkpoint_that_generates(tiny_llama, tmp_path):
    out = tmp_path / "int4"
    result = _run("quantize", str(tiny_llama), "--method", "int4", "--out", str(out))
    assert result.exit_code == 0, result.output
    # q, k, v, o, gate, up and down in each of the 2 layers
    assert "quantized 14 linear layers to int4" in result.output
    assert f"tokenmill serve {out}" in result.output
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    result = _run(
        "generate", "--model", str(out), "--max-tokens", "4", "--temperature", "0", "--device", "cpu", "hi"
    )
    assert result.exit_code == 0, result.output


def test_bad_options_exit_2_naming_them(tiny_llama, tmp_path):
    result = _run("quantize", str(tiny_llama), "--method", "int3", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "--method 'int3' is invalid: allowed int8, int4, fp8" in result.output
    result = _run("quantize", str(tiny_llama), "--method", "int8")
    assert result.exit_code == 2 and "--out is required" in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    result = _run("quantize", str(tiny_llama), "--out", str(tmp_path / "full"))
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.output
    result = _run("quantize", str(tmp_path / "absent"), "--out", str(tmp_path / "y"))
    assert result.exit_code == 2 and "does not exist" in result.output
    done = tmp_path / "int8"
    assert _run("quantize", str(tiny_llama), "--out", str(done)).exit_code == 0
    result = _run("quantize", str(done), "--method", "fp8", "--out", str(tmp_path / "again"))
    assert result.exit_code == 2 and "already quantized" in result.output


def test_an_out_that_cannot_be_a_folder_exits_2_before_any_work(tiny_llama, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = _run("quantize", str(tiny_llama), "--out", str(afile / "sub"))
    assert result.exit_code == 2, result.output
    assert f"--out '{afile / 'sub'}' cannot be created as a folder: '{afile}' is a file" in result.output
    assert "quantized" not in result.output and afile.read_text() == "x"
    if Path("/proc/self").is_dir():  # Linux: nothing can be made in /proc, not even by root
        result = _run("quantize", str(tiny_llama), "--out", "/proc/x")
        assert result.exit_code == 2 and "--out '/proc/x' cannot be created as a folder" in result.output


def test_a_failed_quantization_leaves_no_folder_behind(tiny_llama, tmp_path):
    done = tmp_path / "int8"
    assert _run("quantize", str(tiny_llama), "--out", str(done)).exit_code == 0
    result = _run("quantize", str(done), "--out", str(tmp_path / "new" / "fp8"), "--method", "fp8")
    assert result.exit_code == 2 and "already quantized" in result.output
    assert not (tmp_path / "new").exists()


def test_generate_checks_its_sampling_options_before_loading_the_model(monkeypatch):
    import tokenmill.engine

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(tokenmill.engine, "Engine", no_loading)
    result = _run("generate", "--top-p", "0", "hi")
    assert result.exit_code == 2 and "top_p=0.0 is invalid" in result.output


def test_generate_takes_the_kv_cache_dtype(tiny_llama):
    result = _run("generate", "--model", str(tiny_llama), "--kv-cache-dtype", "fp16", "--device", "cpu", "hi")
    assert result.exit_code == 2 and "'fp16' is not one of 'auto', 'fp8'" in result.output
    result = _run(
        "generate",
        "--model",
        str(tiny_llama),
        "--kv-cache-dtype",
        "fp8",
        "--max-tokens",
        "3",
        "--device",
        "cpu",
        "hi",
    )
    assert result.exit_code == 0, result.output
