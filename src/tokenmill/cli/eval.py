"""``tokenmill eval``: the same questions to several endpoints, graded, compared pairwise.

tokenmill eval examples/questions.jsonl --endpoint full=http://127.0.0.1:8000 --endpoint int8=http://127.0.0.1:8001
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from tokenmill.evals.progress import Progress

err = Console(stderr=True)
PROGRESS_EVERY_S = 10.0  # a line on stderr this often while a run asks, so a slow one is not silent


def eval_command(
    questions: Annotated[
        Path, typer.Argument(help="CSV, XLSX or JSONL: id, question, answer, grader, rubric, tags.")
    ],
    endpoint: Annotated[
        list[str], typer.Option("--endpoint", help="NAME=URL of an OpenAI-compatible server (repeatable).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for answers.jsonl, report.md, report.html.")] = Path(
        "eval-out"
    ),
    judge: Annotated[
        str | None, typer.Option(help="NAME of the endpoint that grades 'judge' questions.")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer, the same for every model.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    system: Annotated[
        str, typer.Option(help="System prompt ('' for none).")
    ] = "Answer the question. Be concise.",
    template: Annotated[
        str, typer.Option(help="User message; {question} is replaced (other braces are kept as written).")
    ] = "{question}",
    model: Annotated[str | None, typer.Option(help="Model name sent to every endpoint.")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key. Default: $TOKENMILL_API_KEY.")] = None,
    bench: Annotated[
        list[str] | None,
        typer.Option(help="NAME=PREFIX.json of a `tokenmill bench run` of that endpoint (repeatable)."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            help="Most seconds one request may take, from sending to its last byte; an endpoint that "
            "cannot answer a 1-token request in that time stops the run."
        ),
    ] = 300.0,
) -> None:
    """Ask every endpoint every question; answers are kept, so running it again resumes."""
    from tokenmill.evals.bench_join import load_bench
    from tokenmill.evals.progress import Progress
    from tokenmill.evals.questions import QuestionError, load_questions
    from tokenmill.evals.report import build_report, to_html, to_markdown
    from tokenmill.evals.runner import EndpointUnusable, EvalSettings, run_eval

    # Checked before any call: an endpoint's 400 for them would read as a question it cannot take.
    if max_tokens < 1:
        _fail(f"--max-tokens {max_tokens} is invalid: allowed an integer >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        _fail(f"--temperature {temperature:g} is invalid: allowed a number >= 0 (0: greedy)")
    if not (math.isfinite(timeout) and timeout > 0):
        _fail(f"--timeout {timeout:g} is invalid: allowed a number of seconds above 0")

    endpoints = {}
    for item in endpoint:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            _fail(f"--endpoint {item!r} is invalid: allowed NAME=http://host:port")
        if name in endpoints:
            _fail(f"--endpoint name {name!r} is given twice")
        endpoints[name] = url
    figures = {}
    for item in bench or []:
        name, sep, path = item.partition("=")
        if not sep or name not in endpoints:
            names = ", ".join(endpoints)
            _fail(f"--bench {item!r} is invalid: allowed NAME=PREFIX.json with NAME one of {names}")
        try:
            figures[name] = load_bench(Path(path))
        except ValueError as e:
            _fail(str(e))
        if figures[name].measured_elsewhere(endpoints[name]):
            # Joined all the same (the URL may differ only by a proxy's name); but a swapped pair of
            # files would put one model's speed beside the other's accuracy, so say so.
            err.print(
                f"[yellow]warning: --bench {escape(item)} measured {escape(str(figures[name].url))}, "
                f"not --endpoint {escape(name)}={escape(endpoints[name])}[/yellow]",
                soft_wrap=True,
            )
    if "{question}" not in template:
        _fail("--template must contain {question}")
    try:
        qs = load_questions(questions)
    except QuestionError as e:
        _fail(str(e))
    # Checked here as well as in run_eval, to name the flag as it is typed.
    if judge is not None and judge not in endpoints:
        _fail(f"--judge {judge!r} is invalid: allowed one of the --endpoint names {', '.join(endpoints)}")
    if judge is None and any(q.grader == "judge" for q in qs):
        _fail(
            "some questions use grader 'judge': name the endpoint that grades them with --judge NAME "
            f"(one of {', '.join(endpoints)})"
        )
    _make_folder(out)
    settings = EvalSettings(system or None, template, max_tokens, temperature, model, timeout)
    key = api_key if api_key is not None else os.environ.get("TOKENMILL_API_KEY")
    progress = Progress()
    run = run_eval(qs, endpoints, settings, out / "answers.jsonl", judge, key, progress)
    try:
        records = asyncio.run(_with_progress(run, progress))
    except (ValueError, EndpointUnusable) as e:
        _fail(str(e))
    err.print(f"[dim]{escape(progress.line())}[/dim]")
    report = build_report(qs, records, list(endpoints))
    markdown = to_markdown(report, figures)
    (out / "report.md").write_text(f"# tokenmill eval: {questions.name}\n\n{markdown}")
    (out / "report.html").write_text(to_html(report, f"tokenmill eval: {questions.name}", figures))
    Console().print(markdown)
    err.print(f"answers: {out / 'answers.jsonl'}; report: {out / 'report.md'}, {out / 'report.html'}")
    refused = [r for r in records if r.refused is not None]
    if refused:
        first = escape(f"{refused[0].endpoint} {refused[0].id}: {refused[0].refused}")
        err.print(
            f"[yellow]{_questions(len(refused))} refused by an endpoint, graded wrong: it cannot take "
            f"them (the first: {first})[/yellow]"
        )
    missing = [r for r in records if not r.graded]
    if missing:
        first = escape(missing[0].error or "no verdict")
        err.print(
            f"[yellow]{_questions(len(missing))} not answered (left out of the accuracy and the paired "
            f"comparison; the first failed with: {first}); run again to retry them[/yellow]"
        )
        raise typer.Exit(1)


def _questions(n: int) -> str:
    return "1 question" if n == 1 else f"{n} questions"


async def _with_progress(run: Coroutine[Any, Any, Any], progress: Progress) -> Any:
    """``run``'s result; meanwhile, every ``PROGRESS_EVERY_S``, how far it is (``progress.line()``)."""
    task = asyncio.ensure_future(run)
    started = time.monotonic()
    while True:
        done, _ = await asyncio.wait({task}, timeout=PROGRESS_EVERY_S)
        if done:
            return task.result()
        err.print(f"[dim]{escape(progress.line())} ({time.monotonic() - started:.0f} s)[/dim]")


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file: allowed a folder (made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a file, in /proc, no permission
        _fail(f"--out {out} cannot be created as a folder: {e.strerror or e}")


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # one line, however narrow
    raise typer.Exit(2)
