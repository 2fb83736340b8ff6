"""``tokenmill batch run`` names its options as the user typed them, and prints paths and
messages as they are (no rich markup read into them)."""

from __future__ import annotations

from tests.client.test_batch import run_cli, write_input


def test_values_the_client_refuses_are_named_as_options(tmp_path):
    """Before: "max_retries=-1 is invalid", "requests_per_minute=0.0 ...": the SDK's argument
    names, not the options given."""
    src = tmp_path / "jobs.jsonl"
    write_input(src, 1)
    for args, says in [
        (["--max-retries", "-1"], "--max-retries=-1 is invalid: allowed an integer >= 0"),
        (["--requests-per-minute", "0"], "--requests-per-minute=0.0 is invalid"),
        (["--max-concurrency", "0"], "--max-concurrency=0 is invalid"),
        (["--api-key", "a\tb"], "--api-key is invalid: allowed one line of latin-1 text"),
    ]:  # fmt: skip
        result = run_cli(str(src), "--url", "http://127.0.0.1:9", *args, timeout=60)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert says in result.stderr.replace("\n", ""), (args, result.stderr)


def test_a_path_holding_brackets_is_printed_not_read_as_markup(tmp_path):
    """Before: an INPUT named "[/x].jsonl" ended in a MarkupError traceback."""
    result = run_cli(str(tmp_path / "[/x].jsonl"), "--url", "http://127.0.0.1:9", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "[/x].jsonl does not exist" in result.stderr.replace("\n", "")


def test_a_worker_named_with_brackets_shows_in_the_spread_table(tmp_path):
    """Before: the job finished, then printing the spread over workers raised a MarkupError
    traceback for a worker whose x-tokenmill-worker held "[/w]"."""
    from tests.bench.test_cli import mock_server

    src = tmp_path / "jobs.jsonl"
    write_input(src, 4)
    with mock_server("--ttft", "0", "--itl", "0", "--worker-id", "[/w]") as a, mock_server() as b:
        result = run_cli(str(src), "--url", a, "--url", b, timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "[/w]" in result.stderr


def test_an_input_with_no_requests_is_refused_not_run(tmp_path):
    """Before: an empty (or blank) INPUT ran, printed "0 succeeded" and exited 0, so a wrong or
    truncated file passed for a finished job."""
    from typer.testing import CliRunner

    from tokenmill.cli.main import app

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\t\n")):
        src = tmp_path / name
        src.write_text(text)
        result = CliRunner().invoke(app, ["batch", "run", str(src), "--url", "http://127.0.0.1:9"],
                                    env={"COLUMNS": "300"})  # fmt: skip
        assert result.exit_code == 2, result.output
        assert f"{name} holds no requests: it is empty or blank" in result.output.replace("\n", "")
        assert not (tmp_path / name).with_suffix(".output.jsonl").exists()
