"""Batch input lines and resume state: every bad line named, cut lines dropped, retryable errors retried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.client.batch_files import (
    BadLine,
    SeenIds,
    check_results_file,
    count_lines,
    dump_record,
    parse_line,
    read_lines,
    resume,
)


def line(**item) -> bytes:
    return json.dumps(item).encode()


@pytest.mark.parametrize(
    ("raw", "code", "says"),
    [
        (b"{oops", "invalid_json", "not valid JSON"),
        (b"[1, 2]", "invalid_json", "JSON object"),
        (line(url="/v1/completions", body={}), "invalid_custom_id", "custom_id"),
        (line(custom_id="a", method="GET", url="/v1/completions", body={}), "invalid_method", "method='GET'"),
        (line(custom_id="a", url="/v1/embeddings", body={}), "invalid_url", "/v1/chat/completions"),
        (line(custom_id="a", url="/v1/completions", body=[]), "invalid_body", "body"),
        (line(custom_id="a", url="/v1/completions", body={"stream": True}), "invalid_body", "body.stream"),
        (b'{"custom_id": "\\ud800", "url": "/v1/completions", "body": {}}', "invalid_custom_id", "surrogate"),
    ],
)
def test_bad_lines_are_refused_with_their_number_and_field(raw, code, says):
    with pytest.raises(BadLine) as info:
        parse_line(17, raw)
    assert info.value.code == code
    assert "line 17" in str(info.value) and says in str(info.value)


def test_resume_keeps_finished_ids_cuts_a_half_written_line_and_drops_retryable_errors(tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    out.write_bytes(
        line(custom_id="a", response={"status_code": 200}) + b"\n"
        + line(custom_id="b", response={"status_code": 200}) + b"\n"
        + b'{"custom_id": "c", "respo'
    )  # fmt: skip
    err.write_bytes(
        line(custom_id="d", line=4, retryable=False, code="http_400") + b"\n"
        + line(custom_id="e", line=5, retryable=True, code="http_503") + b"\n"
        + line(custom_id=None, line=6, retryable=False, bad_line=True, code="invalid_json") + b"\n"
    )  # fmt: skip
    state = resume(out, err)
    assert {"a", "b", "d"} == {c for c in "abcde" if c in state.done}
    assert state.bad_lines == {6}
    assert out.read_bytes().endswith(b"}\n") and out.read_bytes().count(b"\n") == 2
    assert [json.loads(x)["custom_id"] for x in err.read_bytes().splitlines()] == ["d", None]


def test_count_lines_counts_a_last_line_without_newline(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"a\nb\nc")
    assert count_lines(f) == 3


def test_count_lines_counts_what_read_lines_yields_so_a_progress_bar_completes(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"a\n\n  \nb\r\n\r\nc")  # blank lines are not requests
    assert count_lines(f) == len(list(read_lines(f))) == 3


def test_a_record_with_a_lone_surrogate_is_written_as_an_escape_and_read_back(tmp_path):
    record = {"custom_id": "a", "response": {"body": {"text": "odd \udc00"}}}
    raw = dump_record(record)
    assert raw.endswith(b"\n") and json.loads(raw) == record
    assert b"\\udc00" in raw
    assert "\ud800" not in SeenIds() and SeenIds().add("\ud800")  # no UnicodeEncodeError


def test_results_files_must_be_regular_files_in_a_writable_folder(tmp_path):
    check_results_file(tmp_path / "new.jsonl", "--output")  # new: fine
    (tmp_path / "old.jsonl").write_text("")
    check_results_file(tmp_path / "old.jsonl", "--output")
    for path, says in [
        (tmp_path, "it is a folder"),
        (tmp_path / "no" / "x.jsonl", "does not exist"),
        (tmp_path / "old.jsonl" / "x.jsonl", "not a directory"),  # a file is no folder
    ]:
        with pytest.raises(ValueError, match=r"--errors .* is invalid") as info:
            check_results_file(path, "--errors")
        assert says in str(info.value) and "allowed a regular file" in str(info.value)
    for device in ("/dev/null", "/dev/full"):
        with pytest.raises(ValueError, match="not a regular file"):
            check_results_file(Path(device), "--output")
