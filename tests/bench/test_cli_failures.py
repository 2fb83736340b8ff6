"""``tokenmill bench`` when things go wrong: refused requests, bad URLs and paths, Ctrl-C while
writing. Each exits with a one-line reason, and never loses what was measured."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.bench.test_cli import ENV, TOKENMILL, bench, mock_server

SMALL = ["--requests", "4", "--prompt-tokens", "5", "--output-tokens", "3", "--check-tokens", "0"]


@pytest.fixture(scope="module")
def keyed_url():
    """A mock that wants --api-key sekret and names its model strictly."""
    with mock_server("--ttft", "0", "--itl", "0", "--api-key", "sekret", "--strict-model") as url:
        yield url


def test_a_run_where_every_request_is_refused_fails_and_says_why(keyed_url, tmp_path):
    # With --model given, nothing asks /v1/models first; a local tokenizer skips /tokenize:
    # every request goes out and is refused. That used to exit 0 with an empty table.
    prefix = tmp_path / "refused"
    local = ["--model", "mock", "--tokenizer", "src/tokenmill/engine/demo_model/tokenizer.json"]
    done = bench("run", keyed_url, "--api-key", "wrong", *local, *SMALL, "-o", str(prefix))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "http_4xx: 401: invalid API key" in done.stdout  # a sample per error kind
    said = " ".join(done.stderr.split())
    assert "no request succeeded (concurrency 8): http_4xx: 401: invalid API key" in said
    saved = json.loads((tmp_path / "refused.json").read_text())
    assert saved["summary"]["error_samples"] == {"http_4xx": "401: invalid API key"}
    assert "401: invalid API key" in (tmp_path / "refused.html").read_text()


def test_a_sweep_stops_at_a_point_whose_requests_are_all_refused(keyed_url):
    local = ["--model", "nosuch", "--tokenizer", "src/tokenmill/engine/demo_model/tokenizer.json"]
    done = bench("run", keyed_url, "--api-key", "sekret", *local, *SMALL, "--concurrency", "1,2,4")
    assert done.returncode == 1, done.stderr
    assert "concurrency 2" not in done.stdout  # no other load would have been answered
    assert "model 'nosuch' does not exist" in " ".join(done.stderr.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key", "wrong"], "the server's /tokenize answered 401: invalid API key: check --api-key"),
        (
            ["--api-key", "sekret", "--model", "nosuch"],
            "/tokenize answered 404: model 'nosuch' does not exist: this worker serves 'mock': check --model",
        ),
    ],
)
def test_a_tokenize_refused_for_the_key_or_model_says_so_not_that_it_is_missing(keyed_url, args, message):
    model = [] if "--model" in args else ["--model", "mock"]
    done = bench("run", keyed_url, *args, *model, *SMALL)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr


def test_models_refused_for_the_key_says_to_check_the_key(keyed_url):
    done = bench("run", keyed_url, "--api-key", "wrong", *SMALL)
    said = " ".join(done.stderr.split())
    assert done.returncode == 2 and "GET /v1/models answered 401: invalid API key; check --api-key" in said


def test_calibrate_stops_at_once_on_a_refusal_naming_the_server_message(keyed_url):
    done = bench("calibrate", keyed_url, "--api-key", "sekret", "--model", "nosuch", "--seconds", "0.2")
    assert done.returncode == 2, done.stderr
    said = " ".join(done.stderr.split())
    assert "the server refused a request (404): model 'nosuch' does not exist" in said
    assert "no rate fixes that" in said and done.stdout.count("no ") <= 2  # one probe, not a search


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "notaurl"], "URL must look like http://host:port or https://host, got 'notaurl'"),
        (["run", "ftp://127.0.0.1:8100"], "got 'ftp://127.0.0.1:8100'"),
        (["run", "http://127.0.0.1:99999"], "Port out of range"),
        (["calibrate", "notaurl"], "URL must look like"),
        (
            ["run", "http://127.0.0.1:9", "--profile", "poisson", "--rate", "inf"],
            "--rate values must be finite",
        ),
        (
            ["run", "http://127.0.0.1:9", "--profile", "gamma", "--rate", "2", "--burstiness", "0"],
            "--burstiness",
        ),
        (["run", "http://127.0.0.1:9", "--data", "multi-turn", "--turns", "0"], "--turns must be >= 1"),
        (["run", "http://127.0.0.1:9", "--max-lag-p99", "nan"], "--max-lag-p99 must be a finite number"),
        (["run", "http://127.0.0.1:9", "--read-timeout", "0"], "--read-timeout must be a finite number"),
        (["run", "http://127.0.0.1:9", "--gpu-cost-per-hour", "inf"], "--gpu-cost-per-hour must be a finite"),
        (["run", "http://127.0.0.1:9", "--no-stream", "--slo", "tpot=0.05"], "--slo tpot needs"),
        (["run", "http://127.0.0.1:9", "-o", ""], "must be a file prefix"),
        (["run", "http://127.0.0.1:9", "-o", "/proc/x"], "-o /proc/x: cannot write in /proc"),
        (["calibrate", "http://127.0.0.1:9", "--start-rate", "inf"], "--start-rate must be a finite number"),
        (["calibrate", "http://127.0.0.1:9", "--start-rate", "0.001"], "at least 10"),
        (["calibrate", "http://127.0.0.1:9", "--max-lag-p99", "-1"], "--max-lag-p99 must be"),
        (["run", "http://127.0.0.1:0"], "got 'http://127.0.0.1:0' (port 0)"),  # (was a run of failures)
        (["mock-server", "--port", "70000"], "--port must be in 0..65535"),
        (["mock-server", "--port", "-1"], "--port must be in 0..65535"),
    ],
)
def test_bad_values_are_one_line_errors_before_anything_runs(args, message):
    done = bench(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in " ".join(done.stderr.split())


def test_an_output_prefix_that_cannot_be_written_is_refused_before_measuring(tmp_path):
    (tmp_path / "adir.json").mkdir()
    for prefix in (tmp_path / "adir", tmp_path):  # a file would be a folder; the prefix is one
        done = bench("run", "http://127.0.0.1:9", "-o", str(prefix))
        assert done.returncode == 2 and "folder" in done.stderr and "cannot connect" not in done.stderr


def test_a_file_that_is_no_tokenizer_is_a_one_line_error(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    with mock_server("--ttft", "0", "--itl", "0") as url:
        done = bench("run", url, "--tokenizer", str(data), *SMALL)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"--tokenizer {data}: not a tokenizer.json" in " ".join(done.stderr.split())


def test_a_nan_trace_time_is_refused_not_reported_as_nan(tmp_path):
    trace = tmp_path / "it.jsonl"
    trace.write_text('{"timestamp":0}\n{"timestamp":NaN}\n{"timestamp":0.2}\n')
    done = bench("run", "http://127.0.0.1:9", "--trace", str(trace), "--requests", "3")
    assert done.returncode == 2 and 'it.jsonl:2: "timestamp" must be a finite number' in done.stderr


def test_ctrl_c_while_the_files_are_written_still_writes_them_all(tmp_path):
    # The SIGINT arrives inside write_files, the moment it used to lose the HTML: the handler
    # now stays until the files are written.
    patch = (
        "import os, signal, tokenmill.bench.outputs as o\n"
        "real = o.write_files\n"
        "def interrupted(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(*a, **k)\n"
        "o.write_files = interrupted\n"
        "from tokenmill.cli.main import app\n"
        "app()\n"
    )
    prefix = tmp_path / "s"
    with mock_server("--ttft", "0", "--itl", "0") as url:
        args = ["bench", "run", url, *SMALL, "--concurrency", "1,4", "-o", str(prefix)]
        done = subprocess.run(
            [TOKENMILL[0], "-c", patch, *args], capture_output=True, text=True, env=ENV, timeout=60
        )
    assert done.returncode == 0, done.stderr  # the measurement had ended: nothing was cut short
    assert "wrote 2 points to" in " ".join(done.stderr.split())
    assert all((tmp_path / f"s{ext}").exists() for ext in (".csv", ".html", ".0.json", ".1.events.jsonl"))


def test_report_reads_a_prefix_json_keeps_the_cost_and_names_a_bad_line(tmp_path):
    prefix = tmp_path / "r"
    with mock_server("--ttft", "0", "--itl", "0") as url:
        done = bench("run", url, *SMALL, "--gpu-cost-per-hour", "2", "-o", str(prefix))
    assert done.returncode == 0, done.stderr
    assert "replacing" not in done.stderr
    with mock_server("--ttft", "0", "--itl", "0") as url:
        twice = bench("run", url, *SMALL, "--gpu-cost-per-hour", "2", "-o", str(prefix))
    assert "(replacing an earlier run's files)" in " ".join(twice.stderr.split())
    again = bench("report", str(prefix) + ".json")
    assert again.returncode == 0 and "per million output tokens" in again.stdout, again.stderr
    log = tmp_path / "r.events.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines[:3], "{not json", *lines[3:]]) + "\n")
    bad = bench("report", str(log))
    assert bad.returncode == 2 and f"{log}:4: not a request record" in " ".join(bad.stderr.split())
    (tmp_path / "bin.events.jsonl").write_bytes(b"\xff\xfe")
    binary = bench("report", str(tmp_path / "bin.events.jsonl"))
    assert binary.returncode == 2 and "bin.events.jsonl is not UTF-8 text" in binary.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--labels", "a,a"], "--labels must give each run its own non-empty name"),
        (["--labels", ","], "--labels must give each run its own non-empty name"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--html", "{dir}"], "is a folder"),
        (["--html", "{dir}/missing/x.html"], "does not exist"),
    ],
)
def test_compare_refuses_bad_labels_seeds_and_html_paths(tmp_path, args, message):
    from tests.bench.test_compare import saved_run

    a, b = saved_run(tmp_path, "a", 0.0), saved_run(tmp_path, "b", 0.0)
    args = [arg.replace("{dir}", str(tmp_path)) for arg in args]
    done = bench("compare", str(a), str(b), *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in " ".join(done.stderr.split())


def test_compare_warns_when_runs_measure_different_workloads(tmp_path):
    from tests.bench.test_compare import saved_run

    a, b = saved_run(tmp_path, "a", 0.0), saved_run(tmp_path, "b", 0.0)
    log = tmp_path / "b.events.jsonl"
    lines = log.read_text().splitlines()
    header = json.loads(lines[0])
    log.write_text("\n".join([json.dumps({**header, "data": "synthetic 5 -> 64 tokens"}), *lines[1:]]) + "\n")
    done = bench("compare", str(a), str(b))
    assert done.returncode == 0, done.stderr
    assert "b has data 'synthetic 5 -> 64 tokens', a None: not the same workload" in " ".join(
        done.stderr.split()
    )


def test_brackets_in_names_and_urls_print_as_is_and_the_run_is_written(tmp_path):
    """Before: --model "[/x]" (or a server's model, worker or message holding one) ended the
    run in a MarkupError traceback with nothing written; a URL holding one, at the error."""
    prefix = tmp_path / "[red]run"
    local = ["--tokenizer", "src/tokenmill/engine/demo_model/tokenizer.json"]
    with mock_server("--ttft", "0", "--itl", "0") as url:
        done = bench("run", url, "--model", "[/x]", *local, *SMALL, "-o", str(prefix))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "model '[/x]'" in done.stdout
    assert f"wrote the run to {prefix}.events.jsonl" in " ".join(done.stderr.split())
    assert (tmp_path / "[red]run.json").exists()
    bad = bench("run", "http://[/x]", *SMALL)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "got 'http://[/x]'" in bad.stderr


def test_ctrl_c_while_the_prompts_are_built_ends_at_once_and_keeps_an_earlier_run(tmp_path):
    """Before: the build of every prompt went on to its end (minutes for a large run), then an
    empty run of 0 requests replaced the earlier files under the same prefix."""
    prefix = tmp_path / "run"
    (tmp_path / "run.json").write_text('{"an": "earlier run"}')
    load = ["--requests", "20000", "--prompt-tokens", "2000", "--output-tokens", "2"]
    with mock_server("--ttft", "0", "--itl", "0") as url:
        cmd = [*TOKENMILL, "bench", "run", url, *load, "-o", str(prefix)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(4.0)  # start-up ~1.5 s; building 20,000 prompts of 2,000 tokens takes far longer
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped early: nothing was sent, no file written" in err
    assert (tmp_path / "run.json").read_text() == '{"an": "earlier run"}'
    assert not (tmp_path / "run.events.jsonl").exists()


def test_the_key_comes_from_tokenmill_api_key_as_for_every_other_command(keyed_url, tmp_path):
    """bench read only $OPENAI_API_KEY, so a user with $TOKENMILL_API_KEY set (as the client and
    eval docs say) got a 401 before the run."""
    cmd = [*TOKENMILL, "bench", "run", keyed_url, *SMALL, "-o", str(tmp_path / "keyed")]
    env = {k: v for k, v in ENV.items() if k != "OPENAI_API_KEY"}
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "TOKENMILL_API_KEY": "sekret"}, timeout=120
    )
    assert done.returncode == 0, done.stderr
