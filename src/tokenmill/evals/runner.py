"""Asking every model every question, the same way, and grading the answers; resumable.

Every endpoint gets the same chat request per question (``EvalSettings``: system
prompt, template, ``max_tokens``, greedy by default), through tokenmill's paced
client, so a fleet is neither idle nor flooded. Each answer is appended to the
answers file (JSONL) the moment it is graded: a run that stops is resumed by
running it again, and only the missing (endpoint, question) pairs are asked.

A ``judge`` question is graded by the endpoint named as judge: it sees the
question, the rubric, the reference answer (if any) and the candidate's answer,
and must reply PASS or FAIL.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tokenmill.client.async_client import AsyncClient
from tokenmill.client.http_errors import TransportError
from tokenmill.evals.graders import grade
from tokenmill.evals.questions import Question
from tokenmill.protocol.errors import APIError

JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nWhat a correct answer must do (rubric):\n{rubric}\n\n"
    "Reference answer (may be empty):\n{reference}\n\nCandidate answer:\n{answer}\n\n"
    "Reply with exactly one word: PASS if the candidate meets the rubric, FAIL otherwise."
)


@dataclass(frozen=True, slots=True)
class EvalSettings:
    system: str | None = "Answer the question. Be concise."
    template: str = "{question}"
    max_tokens: int = 256
    temperature: float = 0.0
    model: str | None = None  # sent as "model"; None: whatever each endpoint serves


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    endpoint: str
    id: str
    answer: str
    correct: bool | None  # None: no answer (see error)
    detail: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


def load_answers(path: Path) -> dict[tuple[str, str], AnswerRecord]:
    """Answers of earlier runs that need no retry (failed requests are asked again)."""
    done: dict[tuple[str, str], AnswerRecord] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = AnswerRecord(**json.loads(line))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
        if record.error is None:
            done[(record.endpoint, record.id)] = record
    return done


async def run_eval(
    questions: list[Question],
    endpoints: Mapping[str, str],
    settings: EvalSettings,
    answers_path: Path,
    judge: str | None = None,
    api_key: str | None = None,
    on_answer: Callable[[AnswerRecord], None] | None = None,
) -> list[AnswerRecord]:
    """Every (endpoint, question) answered and graded; the records of earlier runs are reused."""
    if judge is not None and judge not in endpoints:
        raise ValueError(
            f"judge={judge!r} is invalid: allowed one of the endpoint names {', '.join(endpoints)}"
        )
    if any(q.grader == "judge" for q in questions) and judge is None:
        raise ValueError("some questions use grader 'judge': name the judging endpoint with judge=")
    done = load_answers(answers_path)
    clients = {name: AsyncClient(url, api_key=api_key) for name, url in endpoints.items()}
    records: list[AnswerRecord] = []
    try:
        with answers_path.open("a", encoding="utf-8") as out:

            async def one(name: str, q: Question) -> None:
                record = done.get((name, q.id))
                if record is None:
                    record = await _answer(clients[name], name, q, settings)
                    if record.error is None and q.grader == "judge":
                        assert judge is not None
                        record = await _judge(clients[judge], q, record, settings)
                    out.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
                    out.flush()
                records.append(record)
                if on_answer is not None:
                    on_answer(record)

            await asyncio.gather(*(one(name, q) for name in endpoints for q in questions))
    finally:
        for client in clients.values():
            await client.aclose()
    order = {(name, q.id): i for i, (name, q) in enumerate((n, q) for n in endpoints for q in questions)}
    return sorted(records, key=lambda r: order[(r.endpoint, r.id)])


def _messages(q: Question, settings: EvalSettings) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    return [*messages, {"role": "user", "content": settings.template.format(question=q.question)}]


async def _answer(client: AsyncClient, name: str, q: Question, settings: EvalSettings) -> AnswerRecord:
    started = time.perf_counter()
    try:
        reply = await client.chat.completions.create(
            messages=_messages(q, settings),
            model=settings.model,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
        )
    except (APIError, TransportError) as e:
        return AnswerRecord(name, q.id, "", None, "", time.perf_counter() - started, 0, 0, str(e))
    latency = time.perf_counter() - started
    text = reply.choices[0].message.content or "" if reply.choices else ""
    usage = reply.usage
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    if q.grader == "judge":
        return AnswerRecord(name, q.id, text, None, "awaiting the judge", latency, prompt, completion)
    verdict = grade(q.grader, text, q.answer, q.tolerance)
    return AnswerRecord(name, q.id, text, verdict.correct, verdict.detail, latency, prompt, completion)


async def _judge(
    client: AsyncClient, q: Question, record: AnswerRecord, settings: EvalSettings
) -> AnswerRecord:
    prompt = JUDGE_PROMPT.format(
        question=q.question, rubric=q.rubric, reference=q.answer, answer=record.answer
    )
    try:
        reply = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}],
            model=settings.model,
            max_tokens=8,
            temperature=0.0,
        )
    except (APIError, TransportError) as e:
        return _replace(record, correct=None, detail="", error=f"judge: {e}")
    verdict = (reply.choices[0].message.content or "").strip().upper() if reply.choices else ""
    if verdict.startswith("PASS"):
        return _replace(record, correct=True, detail="judge: PASS")
    if verdict.startswith("FAIL"):
        return _replace(record, correct=False, detail="judge: FAIL")
    return _replace(record, correct=False, detail=f"judge replied {verdict[:40]!r}, counted as FAIL")


def _replace(record: AnswerRecord, **changes: Any) -> AnswerRecord:
    return AnswerRecord(**{**asdict(record), **changes})
