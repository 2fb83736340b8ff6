"""Graders: does a model's answer match the expected one?

Each question names its grader (``exact``, ``contains``, ``regex``, ``numeric``,
``choice``); every grader returns a ``Grade`` with the verdict and why, so a
report can show what was compared. Text is compared after Unicode NFKC
normalization, case folding and collapsing whitespace, since models differ in
capitals and spacing far more than in substance. (``judge``, grading by a
model against a rubric, needs an endpoint and lives with the runner.)
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

GRADERS = ("exact", "contains", "regex", "numeric", "choice")
# A sign only where no digit comes right before it: "1939-1945" and "10-20" are ranges, not -1945.
_NUMBER = re.compile(r"(?:(?<!\d)[-+])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?")
_LEADING_CHOICE = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])(?:[.):]|$))")
_STATED_CHOICE = re.compile(r"answer\s*(?:is|:)\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)
_NAMED_CHOICE = re.compile(r"\(([A-Za-z])\)|\boption\b\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Grade:
    correct: bool
    detail: str  # what was compared, for the per-question table


def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def grade(grader: str, answer: str, expected: str, tolerance: float = 1e-6) -> Grade:
    """``answer`` against ``expected`` with the named grader; ``tolerance`` is relative (numeric)."""
    if grader == "exact":
        return Grade(normalize(answer) == normalize(expected), "normalized equality")
    if grader == "contains":
        return Grade(normalize(expected) in normalize(answer), f"contains {expected!r}")
    if grader == "regex":
        try:
            pattern = re.compile(expected, re.IGNORECASE | re.DOTALL)
        except re.error as e:
            raise ValueError(f"answer={expected!r} is not a valid regex for grader 'regex': {e}") from None
        return Grade(pattern.search(answer) is not None, f"matches /{expected}/")
    if grader == "numeric":
        return _numeric(answer, expected, tolerance)
    if grader == "choice":
        return _choice(answer, expected)
    raise ValueError(f"grader={grader!r} is invalid: allowed {', '.join(GRADERS)} or judge")


def _to_number(token: str) -> float:
    percent = token.endswith("%")
    value = float(token.rstrip("%").replace(",", ""))
    return value / 100 if percent else value


def _numeric(answer: str, expected: str, tolerance: float) -> Grade:
    found = _NUMBER.findall(expected)
    if not found:
        raise ValueError(f"answer={expected!r} has no number for grader 'numeric'")
    want = _to_number(found[0])
    numbers = _NUMBER.findall(answer)
    if not numbers:
        return Grade(False, "no number in the answer")
    got = _to_number(numbers[-1])  # models reason first and conclude last
    ok = math.isclose(got, want, rel_tol=tolerance, abs_tol=tolerance if want == 0 else 0.0)
    return Grade(ok, f"{got:g} vs {want:g} (relative tolerance {tolerance:g})")


def _choice(answer: str, expected: str) -> Grade:
    want = expected.strip().strip("()").upper()
    if len(want) != 1 or not want.isalpha():
        raise ValueError(f"answer={expected!r} is invalid for grader 'choice': allowed one letter, e.g. B")
    # Markdown emphasis is dropped first ("**B**" is "B"). Then, in this order: the letter after the
    # last "answer is" / "answer:"; a leading "B", "(B) Paris", "B. Paris" (a leading word such as
    # "A good..." or "I think..." is not a choice); a letter named as "(B)" or "Option B" anywhere
    # ("Macbeth (B)"), only if every such mention names the same letter ("(A) or (C)" is no choice).
    text = answer.replace("*", "").strip()
    stated = _STATED_CHOICE.findall(text)
    leading = _LEADING_CHOICE.match(text)
    named = {(a or b).upper() for a, b in _NAMED_CHOICE.findall(text)}
    if stated:
        got = stated[-1].upper()
    elif leading:
        got = (leading.group(1) or leading.group(2)).upper()
    else:
        got = named.pop() if len(named) == 1 else ""
    return Grade(got == want, f"chose {got or 'nothing'}, expected {want}")
