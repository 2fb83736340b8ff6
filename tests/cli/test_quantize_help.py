"""`tokenmill quantize --help` says what happens to the LM head: int8 quantizes it (as it loads, as
--quantization int8 does), int4 and fp8 leave it plain."""

from __future__ import annotations

from typer.testing import CliRunner

from tokenmill.cli.main import app


def test_the_help_says_what_becomes_of_the_lm_head():
    result = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "300"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0
    assert "but the LM head" not in text
    assert (
        "an int8 folder quantizes it as it loads, as --quantization int8 does; int4 and fp8 leave it plain"
        in text
    )
    assert "which the folder then loads in" in text
