"""Graders on the edge cases models produce: capitals, spacing, reasoning before the answer."""

from __future__ import annotations

import pytest

from tokenmill.evals.graders import grade


@pytest.mark.parametrize(
    ("grader", "answer", "expected", "correct"),
    [
        ("exact", "  Paris ", "paris", True),
        ("exact", "Paris, France", "Paris", False),
        ("exact", "ﬁne", "fine", True),  # NFKC: the ligature is two letters
        ("contains", "The capital is PARIS.", "paris", True),
        ("contains", "Lyon", "Paris", False),
        ("regex", "It was 1789 when it began", r"\b17[0-9]{2}\b", True),
        ("regex", "in 1889", r"^17", False),
        ("numeric", "Let me think: 12 * 3 = 36. So the answer is 36.", "36", True),
        ("numeric", "about 3.1416", "3.14159", False),
        ("numeric", "1,234,567 people", "1234567", True),
        ("numeric", "50%", "0.5", True),
        ("numeric", "no idea", "7", False),
        ("choice", "B", "B", True),
        ("choice", "(c) Paris", "C", True),
        ("choice", "B. Lyon", "c", False),
        ("choice", "Looking at A and D, the answer is D.", "D", True),
        ("choice", "A", "(A)", True),
        ("choice", "I cannot tell", "A", False),
        ("choice", "A good question; the answer is C", "C", True),
        ("choice", "A good question", "A", False),
        ("numeric", "The war lasted 1939-1945", "1945", True),
        ("numeric", "between 10-20 items", "20", True),
        ("numeric", "it fell from 5 to -3", "-3", True),
        ("numeric", "x = -2.5e-3", "-0.0025", True),
        ("choice", "**B**", "B", True),
        ("choice", "The answer is **C**.", "C", True),
        ("choice", "Option B", "B", True),
        ("choice", "I would pick option (d).", "D", True),
        ("choice", "Macbeth (B)", "B", True),
        ("choice", "Either (A) or (C)", "A", False),
        ("choice", "Either (A) or (C)", "C", False),
        ("choice", "Both options fit", "S", False),
    ],
)
def test_grader_verdicts(grader, answer, expected, correct):
    assert grade(grader, answer, expected).correct is correct


def test_numeric_tolerance_is_relative():
    assert grade("numeric", "3.1416", "3.14159", tolerance=1e-3).correct
    assert not grade("numeric", "3.2", "3.14159", tolerance=1e-3).correct
    assert grade("numeric", "0", "0", tolerance=1e-6).correct


@pytest.mark.parametrize(
    ("grader", "expected", "says"),
    [("judge-ish", "x", "grader='judge-ish' is invalid: allowed exact"), ("regex", "(", "not a valid regex"),
     ("numeric", "seven", "no number"), ("choice", "AB", "one letter")],
)  # fmt: skip
def test_bad_question_definitions_name_the_field(grader, expected, says):
    with pytest.raises(ValueError, match=says):
        grade(grader, "anything", expected)
