"""``tokenmill eval`` against two real tokenmill servers on loopback: the demo model full and int8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server.conftest import start_server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "questions.jsonl"


@pytest.fixture(scope="module")
def two_models():
    full = start_server("--worker-id", "full")
    try:
        int8 = start_server("--worker-id", "int8", "--quantization", "int8")
    except BaseException:
        full.stop()
        raise
    yield full, int8
    full.stop()
    int8.stop()


def run_eval(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tokenmill.cli.main", "eval", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={"COLUMNS": "200", "PATH": ""}
    )


def test_eval_asks_both_models_grades_reports_and_resumes(two_models, tmp_path):
    full, int8 = two_models
    out = tmp_path / "out"
    args = [
        str(EXAMPLES),
        "--endpoint",
        f"full={full.url}",
        "--endpoint",
        f"int8={int8.url}",
        "--out",
        str(out),
    ]
    args += ["--max-tokens", "16", "--judge", "full"]
    result = run_eval(*args)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert sorted((a["endpoint"], a["id"]) for a in answers) == sorted(
        (e, f"q{i}") for e in ("full", "int8") for i in range(1, 6)
    )
    assert all(a["error"] is None and isinstance(a["correct"], bool) for a in answers)
    report = (out / "report.md").read_text()
    assert "| full |" in report and "| int8 |" in report and "McNemar" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "http" not in html.split("</style>")[1]
    # Run again: nothing is asked twice.
    again = run_eval(*args)
    assert again.returncode == 0, again.stderr
    assert len((out / "answers.jsonl").read_text().splitlines()) == len(answers)


def test_eval_names_bad_endpoints_and_a_missing_judge(tmp_path):
    result = run_eval(str(EXAMPLES), "--endpoint", "full")
    assert (
        result.returncode == 2
        and "--endpoint 'full' is invalid: allowed NAME=http://host:port" in result.stderr
    )
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "a", "question": "Why?", "grader": "judge", "rubric": "says why"}) + "\n")
    result = run_eval(str(q), "--endpoint", "a=http://127.0.0.1:9", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "some questions use grader 'judge': name the endpoint that grades them with --judge NAME" in (
        " ".join(result.stderr.split())
    )
    result = run_eval(str(q), "--endpoint", "a=http://127.0.0.1:9", "--judge", "b", "--out", str(tmp_path))
    assert result.returncode == 2 and "--judge 'b' is invalid: allowed one of the --endpoint names a" in (
        result.stderr
    )


def test_eval_joins_bench_runs_into_a_quality_speed_cost_table(two_models, tmp_path):
    full, int8 = two_models
    bench = tmp_path / "full.json"
    summary = {"ttft": {"median": 0.0123}, "tpot": {"median": 0.0045}, "output_tok_s": 812.0}
    bench.write_text(json.dumps({"run": {}, "summary": summary, "cost": {"per_million_output_tokens": 1.25}}))
    out = tmp_path / "out"
    args = [str(EXAMPLES), "--endpoint", f"full={full.url}", "--endpoint", f"int8={int8.url}"]
    result = run_eval(*args, "--out", str(out), "--max-tokens", "8", "--bench", f"full={bench}")
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "Quality against speed and cost" in report
    assert "| 12.3 | 4.50 | 812 | 1.250 | full.json |" in report
    bad = run_eval(*args, "--out", str(out), "--bench", f"nobody={bench}")
    assert bad.returncode == 2 and "NAME one of full, int8" in bad.stderr
    bad = run_eval(*args, "--out", str(out), "--bench", f"full={tmp_path / 'nothing.json'}")
    assert bad.returncode == 2 and "nothing.json does not exist" in bad.stderr


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _latest(out: Path) -> dict[tuple[str, str], dict]:
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    return {(r["endpoint"], r["id"]): r for r in rows}


def test_a_rerun_grades_stored_answers_against_the_questions_as_they_are_now(two_models, tmp_path):
    full, int8 = two_models
    questions, out = tmp_path / "q.jsonl", tmp_path / "out"
    rows = [
        {"id": "a", "question": "Name a city.", "answer": "zzqzzqzz", "grader": "contains"},
        {"id": "b", "question": "Name a river.", "answer": "zzqzzqzz", "grader": "contains"},
    ]
    _write(questions, rows)
    args = [str(questions), "--endpoint", f"full={full.url}", "--endpoint", f"int8={int8.url}"]
    args += ["--out", str(out), "--max-tokens", "8"]
    assert run_eval(*args).returncode == 0
    before = _latest(out)
    assert not any(r["correct"] for r in before.values())
    assert "| full | 0/2 |" in (out / "report.md").read_text()
    rows[0].update(answer="^", grader="regex")  # matches any answer
    _write(questions, rows)
    result = run_eval(*args)
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "| full | 1/2 |" in report and "| int8 | 1/2 |" in report
    after = _latest(out)
    for name in ("full", "int8"):
        assert after[(name, "a")]["correct"] is True and after[(name, "a")]["detail"] == "matches /^/"
        # graded again, not asked again: the same answer of the same call
        assert after[(name, "a")]["latency_s"] == before[(name, "a")]["latency_s"]
        assert after[(name, "b")] == before[(name, "b")]
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4  # graded again in place, not appended


def test_answers_made_with_other_settings_are_asked_again_not_reused(two_models, tmp_path):
    full, _ = two_models
    questions, out = tmp_path / "q.jsonl", tmp_path / "out"
    _write(questions, [{"id": "a", "question": "Name a city.", "answer": "zz", "grader": "contains"}])
    args = [str(questions), "--endpoint", f"full={full.url}", "--out", str(out)]
    assert run_eval(*args, "--max-tokens", "4").returncode == 0
    assert run_eval(*args, "--max-tokens", "4").returncode == 0  # the same settings: resumed
    assert len((out / "answers.jsonl").read_text().splitlines()) == 1
    first = json.loads((out / "answers.jsonl").read_text())
    assert run_eval(*args, "--max-tokens", "12").returncode == 0  # answers of 4 tokens do not stand in
    records = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["asked"] != first["asked"]  # the answer it replaced is gone
    assert first["completion_tokens"] == 4 < records[0]["completion_tokens"]


def test_a_judge_verdict_is_judged_again_when_the_rubric_changes(two_models, tmp_path):
    full, int8 = two_models
    questions, out = tmp_path / "q.jsonl", tmp_path / "out"
    row = {"id": "j", "question": "Why is the sky blue?", "grader": "judge", "rubric": "mentions light"}
    _write(questions, [row])
    args = [str(questions), "--endpoint", f"full={full.url}", "--endpoint", f"int8={int8.url}"]
    args += ["--judge", "full", "--out", str(out), "--max-tokens", "8"]
    assert run_eval(*args).returncode == 0
    first = _latest(out)
    assert all(r["judged"] and isinstance(r["correct"], bool) for r in first.values())
    assert run_eval(*args).returncode == 0
    assert _latest(out) == first  # the same rubric: the verdicts are kept, nothing is asked
    _write(questions, [{**row, "rubric": "mentions scattering"}])
    result = run_eval(*args)
    assert result.returncode == 0, result.stderr
    again = _latest(out)
    assert len((out / "answers.jsonl").read_text().splitlines()) == 2  # the new verdicts replace the old
    for key, record in again.items():
        assert record["judged"] != first[key]["judged"] and isinstance(record["correct"], bool)
        assert (record["answer"], record["latency_s"]) == (first[key]["answer"], first[key]["latency_s"])
