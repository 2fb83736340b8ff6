"""``--kv-cache-dtype`` takes vLLM's ``fp8_e4m3``; ``fp8_e5m2`` exits 2 with only e4m3 offered."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenmill.cli.main import app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def test_generate_takes_fp8_e4m3(tiny_llama):
    model = ["--model", str(tiny_llama), "--device", "cpu", "--kv-cache-memory", "1048576"]
    code, output = _run("generate", *model, "--max-tokens", "2", "--kv-cache-dtype", "fp8_e4m3", "hi")
    assert code == 0, output
    assert "float8_e4m3fn" in output  # the KV plan line: the same cache as fp8


def test_fp8_e5m2_exits_2_offering_e4m3_only():
    for command in (["serve"], ["generate", "hi"]):
        code, output = _run(*command, "--kv-cache-dtype", "fp8_e5m2")
        assert code == 2, output
        assert "'fp8_e5m2' is not one of 'auto', 'fp8', 'fp8_e4m3'" in output
    code, output = _run("serve", "--help")
    assert "fp8_e4m3" in output and "e5m2 is not supported" in output
