"""``tokenmill eval`` options checked before any model call: one line naming the option, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from tests.evals.test_eval_run import EXAMPLES, run_eval
from tokenmill.evals.bench_join import load_bench


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


def _bench_file(path: Path, url: str) -> Path:
    summary = {"ttft": {"median": 0.01}, "tpot": {"median": 0.004}, "output_tok_s": 800.0}
    path.write_text(json.dumps({"run": {"url": url}, "summary": summary, "cost": {}}))
    return path


def test_a_bench_run_of_another_endpoint_is_warned_about(tmp_path):
    endpoint = "http://127.0.0.1:9"
    other = _bench_file(tmp_path / "other.json", "http://127.0.0.1:8001")
    same = _bench_file(tmp_path / "same.json", "http://localhost:9/v1/")
    assert load_bench(other).measured_elsewhere(endpoint)
    assert not load_bench(same).measured_elsewhere(endpoint)
    args = [str(EXAMPLES), "--endpoint", f"a={endpoint}", "--out", str(tmp_path / "o")]
    result = run_eval(*args, "--bench", f"a={other}")
    assert f"warning: --bench a={other} measured http://127.0.0.1:8001, not --endpoint a={endpoint}" in (
        _one_line(result.stderr)
    )
    result = run_eval(*args, "--bench", f"a={same}")
    assert "warning" not in result.stderr
    missing = tmp_path / "missing.json"
    result = run_eval(*args, "--bench", f"a={missing}")
    assert result.returncode == 2 and f"--bench {missing} does not exist" in _one_line(result.stderr)
