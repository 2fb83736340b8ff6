"""``tokenmill eval`` options checked before any model call: one line naming the option, exit 2."""

from __future__ import annotations

from tests.evals.test_eval_run import EXAMPLES, run_eval


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_an_out_that_is_a_file_or_cannot_be_made_is_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [str(EXAMPLES), "--endpoint", "a=http://127.0.0.1:9"]
    result = run_eval(*args, "--out", str(afile))
    assert result.returncode == 2 and _one_line(result.stderr) == (
        f"error: --out {afile} is a file: allowed a folder (made if missing)"
    )
    result = run_eval(*args, "--out", str(afile / "sub"))
    assert result.returncode == 2 and f"error: --out {afile / 'sub'} cannot be created as a folder" in (
        _one_line(result.stderr)
    )
    assert "Traceback" not in result.stderr
