"""The answers file: one JSON record per (endpoint, question), appended as each is graded.

Only model calls are worth resuming, and only while the model would be asked
the same: each answer keeps a key of what it was asked (the messages, with the
system prompt and template applied, ``max_tokens``, temperature and model
name; ``asked_key``), and a run with other settings asks again rather than
reuse answers made for other ones. Grading is cheap and deterministic, so a
stored answer is graded again against the question file as it is now on every
run (``regrade``): a corrected ``answer``, grader or tolerance takes effect
without asking the model again. A judge's verdict costs a model call; it is
kept while the judge would see the same question, rubric and reference
(``judge_key``, stored with the verdict) and asked again when any of them
changed. A question the endpoint refused (``refused``: a 400, 413 or 422, such
as a prompt longer than its context) is kept as well, graded wrong: asking it
again would get the same refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tokenmill.evals.graders import grade
from tokenmill.evals.questions import Question

AWAITING_JUDGE = "awaiting the judge"
JUDGE_FAILED = "judge: "  # prefix of ``error`` when the answer came and only its judging failed


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    endpoint: str
    id: str
    answer: str
    correct: bool | None  # None: not graded (no answer, see error; or a judge question not judged yet)
    detail: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    judged: str | None = None  # judge questions: judge_key of what the judge saw
    asked: str | None = None  # asked_key of what the model was asked (None: a file of older versions)
    refused: str | None = None  # the endpoint cannot take the question: its status and message

    @property
    def graded(self) -> bool:
        """A verdict to count: the model answered and the answer was graded."""
        return self.error is None and self.correct is not None


def judge_key(q: Question) -> str:
    """What a judge's verdict depends on besides the answer itself (which never changes once stored)."""
    seen = json.dumps([q.question, q.rubric, q.answer], ensure_ascii=False)
    return hashlib.sha256(seen.encode()).hexdigest()[:16]


def asked_key(request: dict[str, object]) -> str:
    """What a model's answer depends on: the request as sent (messages, max_tokens, ...)."""
    seen = json.dumps(request, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(seen.encode()).hexdigest()[:16]


def load_answers(path: Path) -> dict[tuple[str, str], AnswerRecord]:
    """The latest usable record per (endpoint, question) of earlier runs.

    A failed model call is left out, so it is asked again; an answer whose
    judging failed is kept, so only the judge is asked again."""
    return {(r.endpoint, r.id): r for r in _records(path) if _usable(r)}


def rewrite(path: Path, current: Mapping[tuple[str, str], AnswerRecord]) -> None:
    """The file again, with per (endpoint, question) only what a run can still use: the answer
    ``load_answers`` gives (as ``current`` grades it, when there) and the last failed call after it.

    Every run grades the stored answers again, so appending each new grade would add a copy of
    every record per run. Written to a new file renamed over the old: a crash leaves one of them,
    whole. Records of endpoints and questions this run did not have are kept as they were."""
    kept: dict[tuple[str, str], list[AnswerRecord]] = {}
    for r in _records(path):
        before = [x for x in kept.get((r.endpoint, r.id), []) if _usable(x)]
        kept[(r.endpoint, r.id)] = [r] if _usable(r) else [*before, r]
    for key, r in current.items():
        if _usable(r):  # a new grade of the answer kept, or the answer itself (appended last)
            kept[key] = [r, *(x for x in kept.get(key, []) if not _usable(x))]
    text = "".join(_line(r) for records in kept.values() for r in records)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, path)


def _records(path: Path) -> list[AnswerRecord]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(AnswerRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a line cut short by a crash
    return records


def _usable(record: AnswerRecord) -> bool:
    """Worth resuming from: an answer (its judging may have failed), not a failed model call."""
    return record.error is None or record.error.startswith(JUDGE_FAILED)


def _line(record: AnswerRecord) -> str:
    return json.dumps(asdict(record), ensure_ascii=False) + "\n"


def regrade(record: AnswerRecord, q: Question) -> AnswerRecord:
    """A stored answer graded against the question as the file has it now."""
    if record.refused is not None:  # no answer to grade, nor to judge: a model that cannot take it
        return replace(
            record, correct=False, detail=f"cannot take it: {record.refused}", error=None, judged=None
        )
    if q.grader != "judge":
        verdict = grade(q.grader, record.answer, q.answer, q.tolerance)
        return replace(record, correct=verdict.correct, detail=verdict.detail, error=None, judged=None)
    if record.graded and record.judged == judge_key(q):
        return record
    return awaiting_judge(record)


def awaiting_judge(record: AnswerRecord) -> AnswerRecord:
    return replace(record, correct=None, detail=AWAITING_JUDGE, error=None, judged=None)


def append(out_path: Path, record: AnswerRecord) -> None:
    line = _line(record).encode()
    with out_path.open("a+b") as out:  # appends whatever the position; "+": to read the last byte
        if out.seek(0, os.SEEK_END) > 0:
            out.seek(-1, os.SEEK_END)
            if out.read(1) != b"\n":
                # A line cut short by a crash: start a new one, or this record joins it and is lost.
                line = b"\n" + line
        out.write(line)
