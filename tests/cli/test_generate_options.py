"""``tokenmill generate`` takes the engine's KV layout options as ``serve`` does: ``--block-size`` and
``--attention-backend`` (before, only ``serve`` could set them, so a layout seen in a server could not be
tried offline)."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenmill.cli.main import app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def test_generate_runs_with_the_block_size_and_backend_given(tiny_llama):
    model = ["--model", str(tiny_llama), "--device", "cpu", "--kv-cache-memory", "1048576"]
    outputs = {}
    for backend, block in (("reference", "32"), ("cpu", "16")):
        code, output = _run(
            "generate", *model, "--max-tokens", "4", "--temperature", "0",
            "--block-size", block, "--attention-backend", backend, "hi",
        )  # fmt: skip
        assert code == 0, output
        assert f"blocks of {block} tokens" in output  # the KV plan line
        outputs[backend] = output.rsplit("tokens", 1)[1]  # the generated text, after the plan
    assert outputs["reference"] == outputs["cpu"]  # greedy: either layout, the same tokens


def test_bad_values_exit_2_naming_the_field_and_what_is_allowed():
    for flag, value, says in (
        ("--block-size", "7", "block_size=7 is invalid"),
        ("--attention-backend", "warp", "attention_backend='warp' is invalid: allowed one of auto,"),
    ):
        code, output = _run("generate", flag, value, "hi")
        assert code == 2 and says in output, output
