"""Grading by a model: the judging endpoint reads the question, the rubric, the reference and the answer.

It must reply PASS or FAIL; anything else counts as FAIL and says what it was.
The verdict is stored with ``judge_key`` of what the judge saw, so a later run
keeps it only while the question, rubric and reference stay the same.
"""

from __future__ import annotations

from dataclasses import replace

from tokenmill.evals.answers import AnswerRecord, judge_key
from tokenmill.evals.questions import Question
from tokenmill.evals.timed_client import TimedClient

JUDGE_PROMPT = (
    "You grade answers. Question:\n{question}\n\nWhat a correct answer must do (rubric):\n{rubric}\n\n"
    "Reference answer (may be empty):\n{reference}\n\nCandidate answer:\n{answer}\n\n"
    "Reply with exactly one word: PASS if the candidate meets the rubric, FAIL otherwise."
)


async def judge(client: TimedClient, q: Question, record: AnswerRecord, model: str | None) -> AnswerRecord:
    """``record`` with the judge's verdict; a failed call raises (APIError, TransportError)."""
    prompt = JUDGE_PROMPT.format(
        question=q.question, rubric=q.rubric, reference=q.answer, answer=record.answer
    )
    messages = [{"role": "user", "content": prompt}]
    reply, _ = await client.chat({"messages": messages, "model": model, "max_tokens": 8, "temperature": 0.0})
    verdict = (reply.choices[0].message.content or "").strip().upper() if reply.choices else ""
    key = judge_key(q)
    if verdict.startswith("PASS"):
        return replace(record, correct=True, detail="judge: PASS", error=None, judged=key)
    if verdict.startswith("FAIL"):
        return replace(record, correct=False, detail="judge: FAIL", error=None, judged=key)
    detail = f"judge replied {verdict[:40]!r}, counted as FAIL"
    return replace(record, correct=False, detail=detail, error=None, judged=key)
