"""The eval report: accuracy per model with its interval, paired tests, and where the models disagree.

Only graded answers count. A question that got no answer (the request failed,
or its judging did) says nothing about the model, so it is left out of the
accuracy and of every paired comparison, and shown as "not answered" instead
of being graded wrong. A question the endpoint refused (400, 413, 422: longer
than its context, say) does say something: that model cannot take it. It is
graded wrong, counted under "cannot take", and left out of the latency only.
Each pair of models gets McNemar's exact test on the questions both answered;
the per-question table lists only the questions on which the models' verdicts
differ, since those decide every comparison.
"""

from __future__ import annotations

import html
import itertools
import re
import statistics
from dataclasses import dataclass

from tokenmill.evals.answers import AnswerRecord
from tokenmill.evals.bench_join import BenchFigures, quality_table
from tokenmill.evals.paired import PairedResult, compare, wilson_interval
from tokenmill.evals.questions import Question


@dataclass(frozen=True, slots=True)
class ModelSummary:
    name: str
    correct: int
    answered: int  # graded answers: what the accuracy is over
    not_answered: int  # asked and got no verdict (errors); left out of the accuracy
    low: float  # 95% Wilson interval of the accuracy
    high: float
    latency_p50_s: float | None
    completion_tokens: int
    refused: int = 0  # graded wrong: the endpoint cannot take these questions (counted in answered)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


@dataclass(frozen=True, slots=True)
class EvalReport:
    models: list[ModelSummary]
    pairs: list[tuple[str, str, PairedResult]]
    disagreements: list[tuple[Question, dict[str, AnswerRecord]]]


def build_report(questions: list[Question], records: list[AnswerRecord], endpoints: list[str]) -> EvalReport:
    by = {(r.endpoint, r.id): r for r in records}
    graded = {key: r for key, r in by.items() if r.graded}
    models = []
    for name in endpoints:
        asked = [by[(name, q.id)] for q in questions if (name, q.id) in by]
        rows = [r for r in asked if r.graded]
        correct = sum(bool(r.correct) for r in rows)
        low, high = wilson_interval(correct, len(rows)) if rows else (0.0, 0.0)
        latencies = [r.latency_s for r in rows if r.refused is None]  # a refusal is no answer's time
        models.append(
            ModelSummary(
                name, correct, len(rows), len(asked) - len(rows), low, high,
                statistics.median(latencies) if latencies else None, sum(r.completion_tokens for r in asked),
                sum(r.refused is not None for r in rows),
            )
        )  # fmt: skip
    pairs = []
    for a, b in itertools.combinations(endpoints, 2):
        both = [q for q in questions if (a, q.id) in graded and (b, q.id) in graded]
        result = compare(
            [bool(graded[(a, q.id)].correct) for q in both], [bool(graded[(b, q.id)].correct) for q in both]
        )
        pairs.append((a, b, result))
    disagreements = []
    for q in questions:
        verdicts = {graded[(name, q.id)].correct for name in endpoints if (name, q.id) in graded}
        if len(verdicts) > 1:
            disagreements.append((q, {name: by[(name, q.id)] for name in endpoints if (name, q.id) in by}))
    return EvalReport(models, pairs, disagreements)


def to_markdown(report: EvalReport, bench: dict[str, BenchFigures] | None = None) -> str:
    lines = [
        "## Accuracy",
        "",
        "| model | correct | accuracy | 95% interval | not answered | cannot take | latency p50 s "
        "| output tokens |",
    ]
    lines.append("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for m in report.models:
        latency = f"{m.latency_p50_s:.2f}" if m.latency_p50_s is not None else "-"
        accuracy, interval = (
            (f"{m.accuracy:.1%}", f"{m.low:.1%}-{m.high:.1%}") if m.accuracy is not None else ("-", "-")
        )
        lines.append(
            f"| {m.name} | {m.correct}/{m.answered} | {accuracy} | {interval} | {m.not_answered} "
            f"| {m.refused} | {latency} | {m.completion_tokens} |"
        )
    if any(m.not_answered for m in report.models):
        lines += [
            "",
            "Questions not answered (the request or its judging failed) are left out of the accuracy "
            "and of the paired comparison; run again to ask them again.",
        ]
    if any(m.refused for m in report.models):
        lines += [
            "",
            "Questions an endpoint cannot take (it refused them with 400, 413 or 422: longer than its "
            "context, say) are graded wrong, in the accuracy and the paired comparison: a model that "
            "cannot take a question cannot answer it. They are asked again only when the question "
            "or the settings change.",
        ]
    if report.pairs:  # one model: nothing to pair
        lines += _paired(report)
    if report.disagreements:
        names = [m.name for m in report.models]
        lines += ["", "## Questions where the models disagree", ""]
        lines += [
            "| id | question | expected | " + " | ".join(names) + " |",
            "| --- " * (3 + len(names)) + "|",
        ]
        for q, answers in report.disagreements:
            cells = [_cell(answers[n]) if n in answers else "-" for n in names]
            lines.append(
                f"| {_escaped(q.id)} | {_short(q.question)} | {_short(q.answer)} | "
                + " | ".join(cells)
                + " |"
            )
    if bench:
        accuracy = {m.name: m.accuracy for m in report.models}
        lines += ["", *quality_table(accuracy, bench)]
    return "\n".join(lines) + "\n"


def _paired(report: EvalReport) -> list[str]:
    lines = ["", "## Paired comparison (McNemar, exact)", ""]
    lines += [
        "| A | B | only A right | only B right | both | neither | p-value |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for a, b, r in report.pairs:
        lines.append(f"| {a} | {b} | {r.only_a} | {r.only_b} | {r.both} | {r.neither} | {r.p_value:.3g} |")
    lines += [
        "",
        "Each pair is compared on the questions both answered. A p-value under 0.05 says the two "
        "models differ on these questions; above it, they cannot be told apart.",
    ]
    return lines


def to_html(report: EvalReport, title: str, bench: dict[str, BenchFigures] | None = None) -> str:
    """One self-contained page (no scripts, no network): the Markdown tables as HTML tables."""
    body = []
    for block in to_markdown(report, bench).split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|") and not r.startswith("| ---")]
        if rows:
            cells = [
                [html.escape(c.strip().replace("\\|", "|")) for c in _CELL_EDGE.split(r.strip()[1:-1])]
                for r in rows
            ]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
        else:
            text = block.strip()
            tag = "h2" if text.startswith("## ") else "p"
            body.append(f"<{tag}>{html.escape(text.removeprefix('## '))}</{tag}>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}"
    )
    head = f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>"
    return f"{head}<h1>{html.escape(title)}</h1>{''.join(body)}\n"


def _cell(r: AnswerRecord) -> str:
    if r.refused is not None:
        return f"cannot take: {_short(r.refused)}"
    mark = "not answered" if not r.graded else ("right" if r.correct else "wrong")
    return f"{mark}: {_short(r.answer)}"


def _short(text: str, n: int = 60) -> str:
    """A table cell: one line, at most ``n`` characters, its pipes escaped (a regex answer A|B
    reads as written, in Markdown and in the HTML made from it)."""
    flat = " ".join(text.split())
    flat = flat if len(flat) <= n else flat[: n - 1] + "…"
    return _escaped(flat)


def _escaped(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


_CELL_EDGE = re.compile(r"(?<!\\)\|")  # a pipe that is not escaped
