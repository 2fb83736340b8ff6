"""What a report prints and writes: cost at every point, workers by requests and tokens, notes."""

from __future__ import annotations

import csv

import pytest
from rich.console import Console

from tokenmill.bench.metrics import summarize
from tokenmill.bench.records import RequestRecord, read_log, write_log
from tokenmill.bench.report import Cost, csv_row, print_summary, print_sweep, write_csv

RUN = {"url": "http://x", "model": "m", "endpoint": "chat", "profile": "concurrency 2", "data": "d"}


def records(worker_tokens: dict[str, list[int]]) -> list[RequestRecord]:
    out = []
    for worker, counts in worker_tokens.items():
        for n in counts:
            i = len(out)
            out.append(
                RequestRecord(
                    i, None, sent=0.0, end=1.0, status=200, messages=[(0.5, n)], output_tokens=n,
                    counted_output_tokens=n, prompt_tokens=100, worker=worker,
                )
            )  # fmt: skip
    return out


def printed(draw) -> str:
    console = Console(record=True, width=250)
    draw(console)
    return console.export_text()


def test_the_sweep_table_and_csv_give_cost_per_million_output_and_total_tokens(tmp_path):
    # 1 s; 2 requests of 100 prompt and 100 output tokens: 200 output tok/s, 400 in all.
    # $3.6 an hour: 3.6 / (200 * 3600) * 1e6 = $5 per million output tokens, $2.5 per million.
    s = summarize(records({"a": [100, 100]}))
    cost = Cost(3.6)
    table = printed(lambda c: print_sweep(c, [("concurrency 2", s)], cost))
    assert "$ / M output tokens" in table and "$ / M tokens" in table
    assert "5.000" in table and "2.500" in table
    path = tmp_path / "sweep.csv"
    write_csv(path, [csv_row(RUN, s, cost)])
    row = next(csv.DictReader(path.open()))
    assert float(row["usd_per_m_output_tokens"]) == 5.0 and float(row["usd_per_m_tokens"]) == 2.5


def test_the_workers_line_shows_tokens_and_both_imbalances():
    s = summarize(records({"a": [10, 10], "b": [10, 50]}))
    text = printed(lambda c: print_summary(c, RUN, s))
    assert "workers: a 2 req / 20 tok, b 2 req / 60 tok (max/mean: requests 1.00, tokens 1.50)" in text


def test_notes_of_a_degraded_run_are_printed():
    s = summarize(records({"a": [10]}))
    text = printed(lambda c: print_summary(c, {**RUN, "notes": ["token check stopped after 0 of 1"]}, s))
    assert "token check stopped after 0 of 1" in text


def test_the_html_sweep_table_gives_both_costs(tmp_path):
    from tokenmill.bench.html_report import write_html

    points = [
        ({**RUN, "profile": f"concurrency {c}"}, summarize(rs), rs)
        for c, rs in ((1, records({"a": [100]})), (2, records({"a": [100, 100]})))
    ]
    write_html(tmp_path / "sweep.html", points, Cost(3.6), ("concurrency", [1.0, 2.0]))
    html = (tmp_path / "sweep.html").read_text()
    assert "<th>$ / M output tokens</th><th>$ / M tokens</th>" in html and "2.500" in html


def test_text_from_the_user_or_the_server_prints_as_is_not_as_markup():
    """Before: a model, worker or note holding "[/x]" ended the run in rich's MarkupError,
    before its files were written; "[red]" in a name vanished from the report."""
    run = {**RUN, "model": "[/x]", "data": "jsonl runs/[red]q.jsonl", "notes": ["server said [/b]"]}
    s = summarize(records({"w[/0]": [10, 10]}))
    text = printed(lambda c: print_summary(c, run, s))
    assert "model '[/x]'" in text and "runs/[red]q.jsonl" in text
    assert "w[/0] 2 req" in text and "server said [/b]" in text
    assert "[/x]" in printed(lambda c: print_sweep(c, [("trace [/x]", s)]))


def test_a_log_that_is_not_there_is_named_with_where_to_look(tmp_path):
    """Before: raw "[Errno 2] No such file or directory" naming a file not given, and
    "[Errno 21] Is a directory"; a sweep's PREFIX.json, which does not exist, got no hint."""
    write_log(tmp_path / "sw.0.events.jsonl", {}, [])
    with pytest.raises(ValueError, match=r"sw.json: no such file; sw is a sweep: give one of its points"):
        read_log(tmp_path / "sw.json")
    with pytest.raises(ValueError, match=r"^\S*nothing.events.jsonl: no such file$"):
        read_log(tmp_path / "nothing.events.jsonl")
    (tmp_path / "lonely.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lonely.json: no event log lonely.events.jsonl beside it"):
        read_log(tmp_path / "lonely.json")
    with pytest.raises(ValueError, match=r"is a folder: give a run's PREFIX.events.jsonl or PREFIX.json"):
        read_log(tmp_path)
