"""Asking every model every question, the same way, and grading the answers; resumable.

Every endpoint gets the same chat request per question (``EvalSettings``: system
prompt, template, ``max_tokens``, greedy by default), through tokenmill's paced
client, so a fleet is neither idle nor flooded. Each answer is appended to the
answers file (JSONL) the moment it is graded: a run that stops is resumed by
running it again, and only the missing (endpoint, question) pairs are asked;
stored answers are graded again against the question file as it is now
(``answers.regrade``), and a run that ends rewrites the file with them so
graded (``answers.rewrite``), rather than append a copy of each.

Before any question, each endpoint the run needs is checked once
(``endpoint_check``): one that cannot be reached, refuses the key or does not
serve the model stops the run with ``EndpointUnusable``, as it does if that
happens midway; a single question's failure is recorded and asked again on the
next run. A question the endpoint refuses (400, 413, 422: longer than its
context, say) is graded wrong and not asked again while it is asked the same:
leaving it out would favour the model that cannot take it. A ``judge``
question is graded by the endpoint named as judge (``judge.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.client.http_errors import TransportError
from tokenmill.evals.answers import (
    JUDGE_FAILED,
    AnswerRecord,
    append,
    asked_key,
    awaiting_judge,
    load_answers,
    regrade,
    rewrite,
)
from tokenmill.evals.endpoint_check import EndpointUnusable, cannot_take, check_endpoints, endpoint_problem
from tokenmill.evals.graders import grade
from tokenmill.evals.judge import judge as ask_judge
from tokenmill.evals.progress import Progress
from tokenmill.evals.questions import Question
from tokenmill.evals.timed_client import TimedClient
from tokenmill.protocol.errors import APIError

__all__ = ["AnswerRecord", "EndpointUnusable", "EvalSettings", "run_eval"]


@dataclass(frozen=True, slots=True)
class EvalSettings:
    system: str | None = "Answer the question. Be concise."
    template: str = "{question}"
    max_tokens: int = 256
    temperature: float = 0.0
    model: str | None = None  # sent as "model"; None: whatever each endpoint serves
    # Not part of what is asked: the most one request may take, from sending to its last byte.
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        # Checked here, not left to each endpoint: its 400 would be taken for a question it cannot take.
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is invalid: allowed an integer >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature={self.temperature!r} is invalid: allowed a number >= 0 (0: greedy)"
            )
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s={self.timeout_s!r} is invalid: allowed a number of seconds above 0")


async def run_eval(
    questions: list[Question],
    endpoints: Mapping[str, str],
    settings: EvalSettings,
    answers_path: Path,
    judge: str | None = None,
    api_key: str | None = None,
    progress: Progress | None = None,
) -> list[AnswerRecord]:
    """Every (endpoint, question) answered and graded; the answers of earlier runs are reused.

    Raises ``ValueError`` for bad arguments and ``EndpointUnusable`` for an endpoint
    that cannot answer at all (what was answered before it stopped is kept)."""
    _check_arguments(questions, endpoints, judge)
    stored = load_answers(answers_path)
    current = {
        (name, q.id): regrade(stored[(name, q.id)], q)
        for name in endpoints
        for q in questions
        if (name, q.id) in stored and stored[(name, q.id)].asked == asked_key(_request(q, settings))
    }
    needed = {name for name in endpoints for q in questions if (name, q.id) not in current}
    unjudged = {
        key
        for key in ((n, q.id) for n in endpoints for q in questions if q.grader == "judge")
        if key not in current or not current[key].graded
    }
    if judge is not None and unjudged:
        needed.add(judge)
    progress = progress or Progress()
    to_ask = {n: sum((n, q.id) not in current or (n, q.id) in unjudged for q in questions) for n in endpoints}
    progress.start(to_ask, len(questions) * len(endpoints) - sum(to_ask.values()))
    timeout = settings.timeout_s
    checked = {n: endpoints[n] for n in endpoints if n in needed}
    await check_endpoints(checked, settings.model, api_key, timeout, settings.temperature)
    progress.checking = False

    clients = {name: TimedClient(url, api_key, timeout) for name, url in endpoints.items() if name in needed}
    results: dict[tuple[str, str], AnswerRecord] = {}

    async def one(name: str, q: Question) -> None:
        key = (name, q.id)
        record = current.get(key)
        asking, started, fresh = name, time.perf_counter(), record is None
        calls = fresh or (q.grader == "judge" and not record.graded)  # else graded by rule, or kept

        def keep_unjudged() -> None:
            # The run stops while the judge is asked: keep the model's answer, for the next run to judge.
            if fresh and record is not None:
                append(answers_path, awaiting_judge(record))

        try:
            if record is None:
                record = await _answer(clients[name], name, q, settings)
            if q.grader == "judge" and not record.graded:
                assert judge is not None
                asking = judge
                record = await ask_judge(clients[judge], q, awaiting_judge(record), settings.model)
        except (APIError, TransportError, TimeoutError) as e:
            problem = await endpoint_problem(asking, endpoints[asking], e, settings.model, api_key, timeout)
            if problem is not None:
                keep_unjudged()
                raise EndpointUnusable(f"{problem} (the answers so far are kept: {answers_path})") from None
            if isinstance(e, TimeoutError):
                e = TimeoutError(f"no answer within --timeout {timeout:g} s")
            # A refusal of the model's own call (not the judge's) is a question it cannot take.
            if record is None and isinstance(e, APIError) and cannot_take(e):
                record = _refused(name, q, settings, e, time.perf_counter() - started)
            else:
                record = _failed(name, q, record, e, time.perf_counter() - started)
        except asyncio.CancelledError:
            keep_unjudged()
            raise
        if calls:  # what cost a call is kept at once; a new grade of a kept answer, at the end
            append(answers_path, record)
        results[key] = record
        if calls:
            progress.done(name, record.graded)

    try:
        await _all_or_first_error([one(name, q) for name in endpoints for q in questions])
    finally:
        for client in clients.values():
            await client.aclose()
    rewrite(answers_path, results)
    return [results[(name, q.id)] for name in endpoints for q in questions]


def _check_arguments(questions: list[Question], endpoints: Mapping[str, str], judge: str | None) -> None:
    if judge is not None and judge not in endpoints:
        raise ValueError(
            f"judge={judge!r} is invalid: allowed one of the endpoint names {', '.join(endpoints)}"
        )
    if judge is None and any(q.grader == "judge" for q in questions):
        raise ValueError("some questions use grader 'judge': name the judging endpoint with judge=")
    for q in questions:
        if q.grader != "judge":
            grade(q.grader, "", q.answer, q.tolerance)  # a bad regex or number fails before any model call


async def _all_or_first_error(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run them all; the first exception cancels the rest (gather would leave them running)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task in done and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def _request(q: Question, settings: EvalSettings) -> dict[str, Any]:
    """What the model is asked for ``q``: the same for every endpoint."""
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    # Only {question} is replaced: a template may hold other braces, e.g. 'Reply as JSON like {"a": 1}'.
    messages.append({"role": "user", "content": settings.template.replace("{question}", q.question)})
    return {
        "messages": messages,
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
    }


async def _answer(client: TimedClient, name: str, q: Question, settings: EvalSettings) -> AnswerRecord:
    """The model's answer, graded (a judge question: awaiting the judge); a failed call raises.

    Its latency is the endpoint's, from sending (not from joining the client's queue)."""
    request = _request(q, settings)
    reply, latency = await client.chat(request)
    if not reply.choices:  # no answer at all, which grading as an empty one would count wrong
        raise APIError(502, "the reply has no choices", "api_error")
    text = reply.choices[0].message.content or ""
    usage = reply.usage
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    record = AnswerRecord(name, q.id, text, None, "", latency, prompt, completion, asked=asked_key(request))
    return regrade(record, q)


def _refused(name: str, q: Question, settings: EvalSettings, error: APIError, seconds: float) -> AnswerRecord:
    """The endpoint cannot take ``q``: graded wrong, and kept while the model would be asked the same."""
    why = f"{error.status}{f' {error.code}' if error.code else ''}: {error.message}"
    asked = asked_key(_request(q, settings))
    return regrade(AnswerRecord(name, q.id, "", None, "", seconds, 0, 0, asked=asked, refused=why), q)


def _failed(
    name: str, q: Question, record: AnswerRecord | None, error: Exception, seconds: float
) -> AnswerRecord:
    if record is None:  # the model call failed
        return AnswerRecord(name, q.id, "", None, "", seconds, 0, 0, str(error) or type(error).__name__)
    # the answer came and its judging failed: keep it, so the next run asks only the judge
    return replace(record, correct=None, detail="", error=f"{JUDGE_FAILED}{error}", judged=None)
